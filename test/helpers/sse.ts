import { get, type IncomingHttpHeaders, type IncomingMessage } from 'node:http'
import { SseParser, type SseEvent } from '../../lib/wire/sse-frame'

interface Teardown { teardown: (fn: () => unknown) => void }

export interface ReceivedEvent extends Omit<SseEvent, 'data'> { data: any }

/** A real HTTP client reading a text/event-stream, with promises to wait on events. */
export class SseClient {
  readonly status: number
  readonly headers: IncomingHttpHeaders
  readonly events: ReceivedEvent[] = []
  readonly comments: string[] = []
  readonly ended: Promise<void>
  readonly res: IncomingMessage
  body = ''
  #parser = new SseParser()
  #waiters: Array<{ test: (e: ReceivedEvent) => boolean, resolve: (e: ReceivedEvent) => void }> = []

  constructor (res: IncomingMessage) {
    this.res = res
    this.status = res.statusCode ?? 0
    this.headers = res.headers
    res.setEncoding('utf8')
    this.ended = new Promise(resolve => res.once('close', resolve))
    res.on('error', () => {})
    res.on('data', (chunk: string) => {
      this.body += chunk
      for (const line of chunk.split('\n')) if (line.startsWith(':')) this.comments.push(line)
      for (const e of this.#parser.push(chunk)) {
        let data: unknown = e.data
        try { data = JSON.parse(e.data) } catch {}
        const event = { ...e, data }
        this.events.push(event)
        this.#waiters = this.#waiters.filter(w => {
          if (!w.test(event)) return true
          w.resolve(event)
          return false
        })
      }
    })
  }

  get retry (): number | null {
    return this.#parser.retry
  }

  async waitFor (test: (e: ReceivedEvent) => boolean, timeoutMs = 15_000): Promise<ReceivedEvent> {
    const seen = this.events.find(test)
    if (seen !== undefined) return seen
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no such event within ${timeoutMs} ms; got ${JSON.stringify(this.events).slice(0, 500)}`)), timeoutMs)
      this.#waiters.push({ test, resolve: (e) => { clearTimeout(timer); resolve(e) } })
    })
  }

  close (): void {
    this.res.destroy()
  }
}

/** Opens an event stream (resolves once the response headers are in); ended at teardown. */
export async function sse (t: Teardown, url: string, headers: Record<string, string | undefined> = {}): Promise<SseClient> {
  const clean = Object.fromEntries(Object.entries(headers).filter(([, v]) => v !== undefined)) as Record<string, string>
  return await new Promise((resolve, reject) => {
    const req = get(url, { headers: { accept: 'text/event-stream', ...clean } }, (res) => {
      const client = new SseClient(res)
      t.teardown(() => client.close())
      resolve(client)
    })
    req.on('error', reject)
  })
}
