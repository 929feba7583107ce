/**
 * Server-Sent Events framing shared by the server and the client.
 *
 * Every `job_update` event has an `id:` of `<jobId>@<version>`. A stream whose jobs have all ended
 * sends a last `close` event with the id {@link SSE_DONE_ID} and ends; a browser's EventSource
 * then reconnects by itself with that id as `Last-Event-ID`, and the server answers 204, which
 * stops it for good. Any other `Last-Event-ID` gets the current state of every job again (state,
 * not log): whatever the client missed, it has the latest state, the final one included.
 *
 * This module has no server dependencies.
 */

/** The id of the last event of a stream whose jobs have all ended. */
export const SSE_DONE_ID = 'done'

/** One event as text: `data` is JSON-encoded unless it is a string already. */
export function sseFrame (event: string, data: unknown, id?: string): string {
  const json = typeof data === 'string' ? data : JSON.stringify(data)
  // JSON.stringify leaves no raw newline in its output, so `data:` is one line.
  return `${id !== undefined ? `id: ${id}\n` : ''}event: ${event}\ndata: ${json}\n\n`
}

/** The `id:` of a job's event: the job and its version. */
export function sseEventId (jobId: string, version: string): string {
  return `${jobId}@${version}`
}

export interface SseEvent { id?: string, event: string, data: string }

/** The blank line that ends an event. */
const END = /\r?\n\r?\n/

/**
 * Reads a text/event-stream incrementally (for clients without EventSource, such as Node):
 * `push` chunks, get the complete events; comments and `retry:` are returned as `retry`.
 */
export class SseParser {
  /** Text of the event being received, in the chunks it came in: joined once, when it is complete. */
  #parts: string[] = []
  /** The last 3 characters received: an event's end can be split over two chunks. */
  #tail = ''
  retry: number | null = null

  push (chunk: string): SseEvent[] {
    const events: SseEvent[] = []
    // Most chunks of a long event hold no end: kept, not searched again with every chunk after.
    const probe = this.#tail + chunk
    if (!END.test(probe)) {
      this.#parts.push(chunk)
      this.#tail = probe.slice(-3)
      return events
    }
    let buffer = this.#parts.join('') + chunk
    this.#parts = []
    for (;;) {
      const found = END.exec(buffer)
      if (found === null) break
      const block = buffer.slice(0, found.index)
      buffer = buffer.slice(found.index + found[0].length)
      let id: string | undefined
      let event = 'message'
      const data: string[] = []
      for (const line of block.split(/\r?\n/)) {
        if (line === '' || line.startsWith(':')) continue
        const colon = line.indexOf(':')
        const field = colon < 0 ? line : line.slice(0, colon)
        const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '')
        if (field === 'id') id = value
        else if (field === 'event') event = value === '' ? 'message' : value
        else if (field === 'data') data.push(value)
        else if (field === 'retry' && /^\d+$/.test(value)) this.retry = Number(value)
      }
      if (data.length > 0) events.push({ ...(id !== undefined ? { id } : {}), event, data: data.join('\n') })
    }
    if (buffer !== '') this.#parts.push(buffer)
    this.#tail = buffer.slice(-3)
    return events
  }
}
