/**
 * How each transport carries a connection's jobs: the `jobs` protocol over one WebSocket; one
 * multiplexed Server-Sent Events stream read with fetch (so it can carry an API key header and
 * runs in Node too), where adding a job means a new request, and the caller's jobs feed on a
 * stream of its own; or the status route of each job every `pollIntervalMs`, which always works.
 * The connection (client/index.ts) decides when to open, fall back, upgrade and retry.
 *
 * Internal names end with `_`: the build shortens them (scripts/build-client.mjs).
 */
import { shouldRetry } from '../lib/wire/close-codes'
import type { JobStatus, JobUpdateMessage, ProgressMessage } from '../lib/wire/messages'
import { AuthError, ConnectionError, HttpError, NotFoundError } from './errors'
import type { MyJobs } from './my-jobs'
import type { Watch } from './watch'

type Timer = ReturnType<typeof setTimeout> | undefined

/** JSON text to a value; null when it is not JSON. */
export const parse = (text: string): any => {
  try { return JSON.parse(text) } catch { return null }
}

export const authError = (reason?: string): AuthError => new AuthError(reason || 'authentication required')

/** What a close code means for the client: null to reconnect, else the error that ends the connection's watches. */
export const closeError = (code: number, reason: string): Error | null =>
  code === 4001 ? authError(reason) : shouldRetry(code) || code === 1000 ? null : new ConnectionError(code, reason)

/** The status route's seed statuses in the `jobs` protocol's words (`failed` and `cancelled` are the same). */
const POLL_STATUS: Record<string, JobStatus> = { processing: 'running', complete: 'succeeded' }

/** What every connection of a client shares: where and how to connect, and what is watched. */
export interface Env {
  base_: string
  key_?: string
  via_: 'subprotocol' | 'query' | 'first-message'
  Ws_?: typeof WebSocket
  wsPath_: string
  ssePath_: string
  /** The caller's jobs route; its feed is `<mine_>/events`. */
  mine_: string
  headers_: Record<string, string>
  pollMs_: number
  request_: (url: URL, init?: RequestInit) => Promise<Response>
  route_: (name: 'status' | 'result', kind: string, jobId: string) => URL
  watches_: Map<string, Watch>
  feeds_: Set<MyJobs>
  active_: () => Watch[]
  /** The SSE `Last-Event-ID` to resume from: the newest state held. */
  last_?: string
  /** A job's state, in the `jobs` protocol's words. */
  update_: (m: JobUpdateMessage) => void
}

/** One connection, as its transport sees it. */
export interface Link {
  /** The jobs it carries: job id to kind; `''` is the caller's jobs feed. */
  w_: Map<string, string>
  /** It ended (closed, or reported its end). */
  ended_: boolean
  /** It went live (the server said so). */
  up_: boolean
  live_: () => void
  /** It ended: null to reconnect, else the error that ends its watches. */
  end_: (error: Error | null) => void
  /** A message of the `jobs` protocol, or an SSE event (its `event:` as the type). */
  msg_: (type: string, m: any) => void
  touch_: () => void
  /** Set by the transport: a job added (or asking for more), removed; the connection closed. */
  add_: (jobId: string) => void
  rm_: (jobId: string) => void
  stop_: () => void
}

export const transports: Record<'websocket' | 'sse' | 'polling', (l: Link, o: Env) => void> = {
  websocket (l, o) {
    const url = new URL(o.wsPath_, o.base_)
    const key = o.key_
    url.protocol = url.protocol.replace('http', 'ws')
    if (key && o.via_ === 'query') url.searchParams.set('api_key', key)
    let ws: WebSocket
    try {
      ws = new (o.Ws_ as typeof WebSocket)(url, key && o.via_ === 'subprotocol' ? [key] : undefined)
    } catch {
      // A key a browser refuses as a subprotocol (`=` or `/` in it): counts as a failure, so the next transport is tried.
      return l.end_(null)
    }
    // Sending on a closing socket does nothing.
    // A watch that wants log lines resumes after the last one it has.
    const send = (action: string) => (jobId: string): void => {
      const w = o.watches_.get(jobId)
      if (l.up_) ws.send(JSON.stringify(jobId ? { action, job_id: jobId, logs: w?.logs ? { from: w.next } : undefined, streams: w?.streams } : { action: action + '_mine' }))
    }
    l.add_ = send('subscribe')
    l.rm_ = send('unsubscribe')
    // A close event follows every error; an error without a listener would throw in Node's `ws`.
    ws.onerror = () => {}
    ws.onopen = () => {
      if (key && o.via_ === 'first-message') ws.send(JSON.stringify({ token: key }))
    }
    ws.onmessage = (e: MessageEvent) => {
      l.touch_()
      const m = parse(e.data)
      if (m?.type !== 'connected') return l.msg_(m?.type, m)
      l.live_()
      for (const jobId of l.w_.keys()) l.add_(jobId)
    }
    ws.onclose = (e: CloseEvent) => l.end_(closeError(e.code, e.reason))
    l.stop_ = () => {
      ws.onclose = null
      try { ws.close(1000) } catch {}
    }
  },

  sse (l, o) {
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
  },

  polling (l, o) {
    let timer: Timer
    const round = async (): Promise<void> => {
      for (const [jobId, kind] of [...l.w_]) {
        if (l.ended_) return
        if (!jobId) {
          // No feed here: each round reads the lists again.
          l.live_()
          o.feeds_.forEach(f => f._sync())
          continue
        }
        let res: Response
        try { res = await o.request_(o.route_('status', kind, jobId)) } catch { return l.end_(null) }
        if (l.ended_) return
        if (res.status === 404) {
          l.w_.delete(jobId)
          o.watches_.get(jobId)?._end(new NotFoundError(jobId))
          continue
        }
        if (res.status !== 200) return l.end_(res.status === 401 ? authError() : null)
        let p: ProgressMessage
        try { p = await res.json() } catch { return l.end_(null) }
        let result: unknown = null
        if (p.status === 'complete') {
          try {
            result = (await (await o.request_(o.route_('result', kind, jobId))).json()).result ?? null
          } catch {}
        }
        if (l.ended_) return
        l.live_()
        l.touch_()
        o.update_({ ...p, status: POLL_STATUS[p.status] ?? p.status, result, error: p.error ?? null } as unknown as JobUpdateMessage)
        if (p.status !== 'processing') l.w_.delete(jobId)
      }
      if (!l.ended_) timer = setTimeout(round, o.pollMs_)
    }
    l.stop_ = () => clearTimeout(timer)
    void round()
  }
}
