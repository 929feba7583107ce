import { shouldRetry } from '../lib/wire/close-codes'
import type { JobUpdateMessage, ProgressMessage } from '../lib/wire/messages'
import { AuthError, ConnectionError } from './errors'
import type { Transport } from './types'

/** What a connection reports to the client. */
export interface ConnHandlers {
  /** The connection can carry subscriptions now (reported once per connection). */
  live: () => void
  /** Any data arrived (for the heartbeat watchdog). */
  touch: () => void
  update: (message: JobUpdateMessage, kind?: string) => void
  /** A job the server will not tell us about. */
  notFound: (jobId: string, message: string) => void
  /** The connection ended. `fatal`: do not retry (wrong credentials, a refused close code). */
  down: (fatal: Error | null) => void
}

export interface Conn {
  /** Watch this job too. */
  add: (kind: string, jobId: string) => void
  remove: (jobId: string) => void
  /** Ends the connection without reporting `down`. */
  close: () => void
}

export interface ConnContext {
  baseUrl: string
  apiKey?: string | undefined
  apiKeyVia: 'subprotocol' | 'query' | 'first-message'
  credentials: RequestCredentials
  fetch: typeof fetch
  WebSocket?: typeof WebSocket | undefined
  wsPath: string
  ssePath: string
  statusPath: (kind: string, jobId: string) => string
  resultPath: (kind: string, jobId: string) => string
  pollIntervalMs: number
  /** The id of the last event received, sent as `Last-Event-ID` when an SSE stream starts again. */
  lastEventId: () => string | undefined
}

export type Open = (transport: Transport, jobs: Array<{ kind: string, jobId: string }>, on: ConnHandlers) => Conn

/** JSON text to a value; null when it is not JSON. */
export const parse = (text: string): any => {
  try { return JSON.parse(text) } catch { return null }
}

export const authError = (reason?: string): AuthError => new AuthError(reason || 'authentication required')

/** What a close code means for the client: null to reconnect, else the error that ends the watches. */
const closeError = (code: number, reason: string): Error | null =>
  code === 4001 ? authError(reason) : shouldRetry(code) || code === 1000 ? null : new ConnectionError(code, reason)

const POLL_STATUS = { processing: 'running', complete: 'succeeded', failed: 'failed', cancelled: 'cancelled' } as const

/**
 * The three transports over one context. They share the watched jobs, the end of a connection
 * and the reading of a message; each adds only how it carries them: the `jobs` protocol over one
 * WebSocket; one multiplexed Server-Sent Events stream read with fetch (so it can carry an API
 * key header and runs in Node too), where adding a job means a new request; or the status route
 * of each job every `pollIntervalMs`, the transport that always works.
 */
export function transports (ctx: ConnContext): Open {
  const { baseUrl, apiKey, apiKeyVia, credentials, fetch, WebSocket: Ws, wsPath, ssePath, statusPath, resultPath, pollIntervalMs, lastEventId } = ctx
  const headers: Record<string, string> = apiKey !== undefined ? { authorization: `Bearer ${apiKey}` } : {}
  const get = async (path: string): Promise<Response> => await fetch(new URL(path, baseUrl), { headers, credentials })

  return (transport, jobs, on) => {
    const watched = new Map(jobs.map(j => [j.jobId, j.kind]))
    let ended = false
    let wentLive = false
    let timer: ReturnType<typeof setTimeout> | undefined
    // What each transport does when a job is added or removed, and when the connection ends.
    let added = (_jobId: string): void => {}
    let removed = added
    let stop = (): void => { clearTimeout(timer) }
    const live = (): void => {
      if (!wentLive) { wentLive = true; on.live() }
    }
    const end = (fatal: Error | null): void => {
      if (ended) return
      ended = true
      stop()
      on.down(fatal)
    }
    /** A message of the `jobs` protocol, or an SSE event (its `event:` as the type). */
    const dispatch = (type: string, m: any): void => {
      if (m === null) return
      if (type === 'job_update') on.update(m, watched.get(m.job_id))
      else if (type === 'error' && typeof m.job_id === 'string') on.notFound(m.job_id, String(m.message))
      else if (type === 'close') end(closeError(Number(m.code), String(m.reason)))
    }

    if (transport === 'websocket') {
      const url = new URL(wsPath, baseUrl)
      url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:'
      if (apiKey !== undefined && apiKeyVia === 'query') url.searchParams.set('api_key', apiKey)
      const ws = apiKey !== undefined && apiKeyVia === 'subprotocol' ? new (Ws as typeof WebSocket)(url, [apiKey]) : new (Ws as typeof WebSocket)(url)
      const send = (message: object): void => { if (wentLive && ws.readyState === 1) ws.send(JSON.stringify(message)) }
      added = (jobId) => send({ action: 'subscribe', job_id: jobId })
      removed = (jobId) => send({ action: 'unsubscribe', job_id: jobId })
      // A close event follows every error; an error without a listener would throw in Node's `ws`.
      ws.onerror = () => {}
      ws.onopen = () => {
        if (apiKey !== undefined && apiKeyVia === 'first-message') ws.send(JSON.stringify({ token: apiKey }))
      }
      ws.onmessage = (e: MessageEvent) => {
        on.touch()
        const m = parse(String(e.data))
        if (m?.type !== 'connected') return dispatch(m?.type, m)
        live()
        for (const jobId of watched.keys()) added(jobId)
      }
      ws.onclose = (e: CloseEvent) => end(closeError(e.code, e.reason))
      stop = () => {
        ws.onclose = null
        try { ws.close(1000, 'client done') } catch {}
      }
    } else if (transport === 'sse') {
      let controller: AbortController | undefined
      const start = async (): Promise<void> => {
        controller?.abort()
        const abort = controller = new AbortController()
        const url = new URL(ssePath, baseUrl)
        url.searchParams.set('jobs', [...watched.keys()].join(','))
        const last = lastEventId()
        let res: Response
        try {
          res = await fetch(url, { headers: { accept: 'text/event-stream', ...headers, ...(last !== undefined ? { 'last-event-id': last } : {}) }, credentials, signal: abort.signal })
        } catch {
          // A stream replaced by a newer request ends quietly.
          if (abort === controller) end(null)
          return
        }
        if (abort !== controller) return
        const { status, body } = res
        if (status !== 200 || body === null || !(res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
          body?.cancel().catch(() => {})
          // 204: every job had ended already; 400 and 429: the request is refused as it is.
          return end(status === 401 ? authError() : status === 400 || status === 429 ? new ConnectionError(status, 'request refused') : null)
        }
        live()
        const reader = body.pipeThrough(new TextDecoderStream()).getReader()
        let buffer = ''
        try {
          for (;;) {
            const { done, value } = await reader.read()
            if (done) break
            on.touch()
            const blocks = (buffer + value).split(/\r?\n\r?\n/)
            buffer = blocks.pop() as string
            for (const block of blocks) {
              // Comments (heartbeats) and `id:`/`retry:` lines are not needed: the client keeps its
              // own last event id (from versions) and its own backoff.
              let event = 'message'
              const data: string[] = []
              for (const [, field, value] of block.matchAll(/^(event|data): ?(.*)/gm)) {
                if (field === 'event') event = value
                else data.push(value)
              }
              dispatch(event, parse(data.join('\n')))
            }
          }
        } catch {}
        if (abort === controller) end(null)
      }
      // Jobs watched in one go (a page opening with 50) make one request, not 50 in a row. The
      // stream ends by itself once the jobs it names have ended; a job no longer wanted is only
      // ignored, so removing one costs no new request.
      added = () => {
        clearTimeout(timer)
        timer = setTimeout(() => { void start() }, 0)
      }
      added('')
      stop = () => {
        clearTimeout(timer)
        controller?.abort()
      }
    } else {
      const round = async (): Promise<void> => {
        for (const [jobId, kind] of [...watched]) {
          if (ended) return
          let res: Response
          try { res = await get(statusPath(kind, jobId)) } catch { return end(null) }
          if (res.status === 404) {
            watched.delete(jobId)
            on.notFound(jobId, 'Job not found or access denied')
            continue
          }
          if (res.status !== 200) return end(res.status === 401 ? authError() : null)
          live()
          on.touch()
          const p = await res.json() as ProgressMessage
          let result: unknown = null
          if (p.status === 'complete') {
            try {
              const r = await get(resultPath(kind, jobId))
              if (r.status === 200) result = (await r.json()).result
            } catch {}
          }
          on.update({ ...p, type: 'job_update', status: POLL_STATUS[p.status], result, error: p.error ?? null, ts: 0 }, kind)
          if (p.status !== 'processing') watched.delete(jobId)
        }
        if (!ended) timer = setTimeout(() => { void round() }, pollIntervalMs)
      }
      void round()
    }

    return {
      add (kind, jobId) {
        if (!watched.has(jobId)) { watched.set(jobId, kind); added(jobId) }
      },
      remove (jobId) {
        if (watched.delete(jobId)) removed(jobId)
      },
      close () {
        ended = true
        stop()
      }
    }
  }
}
