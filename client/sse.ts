import { ConnectionError, HttpError } from './errors'
import { authError, parse, type Env, type Link } from './link'

type Timer = ReturnType<typeof setTimeout> | undefined

/**
 * Server-Sent Events, read with fetch (so it can carry an API key header and runs in Node too):
 * one multiplexed stream for the watched jobs, where adding a job means a new request, and the
 * caller's jobs feed on a stream of its own. Loaded when first used (a fallback).
 */
export function sse (l: Link, o: Env): void {
  let timer: Timer
  // One stream for the watched jobs (`j`), one for the caller's jobs feed (`''`), each replaced by a newer request.
  const controllers: Record<string, AbortController | undefined> = {}
  const open = async (key: string, url: URL, last?: string): Promise<void> => {
    controllers[key]?.abort()
    const abort = controllers[key] = new AbortController()
    const current = (): boolean => abort === controllers[key]
    // The jobs' stream ends by itself once its jobs have ended: while a feed goes on, no reason to reconnect.
    const over = (error: Error | null): void => { if (current() && (error || !key || o.active_().length)) l.end_(error) }
    let res: Response
    try {
      res = await o.request_(url, { headers: { accept: 'text/event-stream', ...o.headers_, ...(last && { 'last-event-id': last }) }, signal: abort.signal })
    } catch {
      // A stream replaced by a newer request ends quietly.
      return over(null)
    }
    if (!current()) return
    const { status, body } = res
    if (status !== 200 || !body || !/^text\/event-stream/.test(res.headers.get('content-type') as string)) {
      // 204: every job had ended already; 401, 400 and 429: the request is refused as it is, and its body says why.
      const why = status > 399 ? parse(await res.text().catch(() => ''))?.message : body?.cancel().catch(() => {})
      // No feed on this server: the lists end, the connection goes on.
      if (!key && status === 404) return o.feeds_.forEach(f => f._end(new HttpError(status, why || 'no jobs feed')))
      return over(status === 401 ? authError(why) : status === 400 || status === 429 ? new ConnectionError(status, why || 'request refused') : null)
    }
    l.live_()
    const reader = body.pipeThrough(new TextDecoderStream()).getReader()
    let buffer = ''
    try {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) break
        l.touch_()
        const blocks = (buffer + value).split(/\r?\n\r?\n/)
        buffer = blocks.pop() as string
        for (const block of blocks) {
          // The server writes one `data:` line per event (its JSON holds no raw newline).
          // Comments (heartbeats), `id:` and `retry:` are not needed: the client keeps its own
          // last event id (from versions) and its own backoff.
          // Not `.`: it stops at U+2028 and U+2029, which JSON leaves unescaped.
          const [, event, data] = /^event: ?([^\r\n]*)\r?\ndata: ?([^\r\n]*)/m.exec(block) ?? []
          l.msg_(event as string, parse(data as string))
        }
      }
    } catch {}
    over(null)
  }
  const start = (): void => {
    const jobs = [...l.w_.keys()].filter(Boolean)
    if (!jobs.length) return
    const url = new URL(o.ssePath_, o.base_)
    url.searchParams.set('jobs', jobs + '')
    // Lines from the oldest kept: the watches drop those they have.
    if (o.active_().some(w => w.logs)) url.searchParams.set('logs', '1')
    // Each stream from the next chunk its watch needs.
    const from = o.active_().flatMap(w => Object.entries(w.streams ?? {}).map(([n, at]) => `${w.jobId}@${n}:${at}`))
    if (from.length) url.searchParams.set('streams_from', from + '')
    void open('j', url, o.last_)
  }
  // Jobs watched in one go (a page opening with 50) make one request, not 50 in a row. The
  // stream ends by itself once the jobs it names have ended; a job no longer wanted is only
  // ignored, so removing one costs no new request. The feed has its own stream, from the
  // start: every list is read again once it is in effect (`subscribed`).
  l.add_ = (jobId) => {
    if (!jobId) {
      void open('', new URL(`${o.mine_}/events`, o.base_))
      return
    }
    clearTimeout(timer)
    timer = setTimeout(start)
  }
  l.rm_ = (jobId) => {
    const abort = controllers[jobId]
    controllers[jobId] = undefined
    abort?.abort()
  }
  if (l.w_.has('')) l.add_('')
  l.add_('j')
  l.stop_ = () => {
    clearTimeout(timer)
    for (const abort of Object.values(controllers)) abort?.abort()
  }
}
