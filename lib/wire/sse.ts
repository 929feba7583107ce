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

/**
 * Reads a text/event-stream incrementally (for clients without EventSource, such as Node):
 * `push` chunks, get the complete events; comments and `retry:` are returned as `retry`.
 */
export class SseParser {
  #buffer = ''
  retry: number | null = null

  push (chunk: string): SseEvent[] {
    this.#buffer += chunk
    const events: SseEvent[] = []
    let end
    while ((end = this.#buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = this.#buffer.slice(0, end)
      this.#buffer = this.#buffer.slice(end + (this.#buffer[end] === '\r' ? 4 : 2))
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
    return events
  }
}
