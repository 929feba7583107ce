import { CloseCodes, shouldRetry } from '../lib/wire/close-codes'
import type { JobUpdateMessage, ProgressMessage } from '../lib/wire/messages'
import { SSE_DONE_ID, SseParser } from '../lib/wire/sse'
import { AuthError, ConnectionError } from './errors'

/** What a connection reports to the client. */
export interface ConnHandlers {
  /** The connection can carry subscriptions now. */
  live: () => void
  /** Any data arrived (for the heartbeat watchdog). */
  touch: () => void
  update: (message: JobUpdateMessage, kindHint?: string) => void
  /** A job the server will not tell us about. */
  notFound: (jobId: string, message: string) => void
  /** The connection ended. `fatal`: do not retry (wrong credentials, a refused close code). */
  down: (fatal: Error | null) => void
}

export interface Conn {
  /** Watch these jobs too (a job id and its kind). */
  add: (jobs: Array<{ kind: string, jobId: string }>) => void
  remove: (jobId: string) => void
  close: () => void
}

export interface ConnContext {
  baseUrl: string
  apiKey?: string
  apiKeyVia: 'subprotocol' | 'query' | 'first-message'
  credentials: RequestCredentials
  fetch: typeof fetch
  WebSocket?: typeof WebSocket
  wsPath: string
  ssePath: string
  statusPath: (kind: string, jobId: string) => string
  resultPath: (kind: string, jobId: string) => string
  pollIntervalMs: number
}

export function authHeaders (ctx: ConnContext): Record<string, string> {
  return ctx.apiKey !== undefined ? { authorization: `Bearer ${ctx.apiKey}` } : {}
}

/** The `jobs` protocol over one WebSocket. */
export function openWebSocket (ctx: ConnContext, jobs: Array<{ kind: string, jobId: string }>, on: ConnHandlers): Conn {
  const Ws = ctx.WebSocket as typeof WebSocket
  const url = new URL(ctx.wsPath, ctx.baseUrl)
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:'
  if (ctx.apiKey !== undefined && ctx.apiKeyVia === 'query') url.searchParams.set('api_key', ctx.apiKey)
  const ws = ctx.apiKey !== undefined && ctx.apiKeyVia === 'subprotocol' ? new Ws(url, [ctx.apiKey]) : new Ws(url)
  const watched = new Set(jobs.map(j => j.jobId))
  let ready = false
  let ended = false
  const send = (message: unknown): void => { if (ready && ws.readyState === 1) ws.send(JSON.stringify(message)) }
  const end = (fatal: Error | null): void => {
    if (ended) return
    ended = true
    on.down(fatal)
  }
  // A close event follows every error; an error without a listener would throw in Node's `ws`.
  ws.onerror = () => {}
  ws.onopen = () => {
    if (ctx.apiKey !== undefined && ctx.apiKeyVia === 'first-message') ws.send(JSON.stringify({ token: ctx.apiKey }))
  }
  ws.onmessage = (e: MessageEvent) => {
    on.touch()
    let m: Record<string, any>
    try { m = JSON.parse(String(e.data)) } catch { return }
    switch (m.type) {
      case 'connected':
        ready = true
        on.live()
        for (const jobId of watched) send({ action: 'subscribe', job_id: jobId })
        break
      case 'job_update':
        on.update(m as JobUpdateMessage)
        break
      case 'error':
        if (typeof m.job_id === 'string') on.notFound(m.job_id, String(m.message))
        break
    }
  }
  ws.onclose = (e: CloseEvent) => {
    if (e.code === CloseCodes.unauthorized) return end(new AuthError(e.reason !== '' ? e.reason : 'authentication required'))
    end(shouldRetry(e.code) || e.code === CloseCodes.normal ? null : new ConnectionError(e.code, e.reason))
  }
  return {
    add (more) {
      for (const { jobId } of more) {
        if (watched.has(jobId)) continue
        watched.add(jobId)
        send({ action: 'subscribe', job_id: jobId })
      }
    },
    remove (jobId) {
      if (watched.delete(jobId)) send({ action: 'unsubscribe', job_id: jobId })
    },
    close () {
      ended = true
      ws.onclose = null
      try { ws.close(1000, 'client done') } catch {}
    }
  }
}

/**
 * One multiplexed Server-Sent Events stream, read with fetch (so it can carry an API key header
 * and runs in Node too). Adding a job means a new request: the old stream is replaced.
 */
export function openSse (ctx: ConnContext, jobs: Array<{ kind: string, jobId: string }>, on: ConnHandlers, lastEventId?: () => string | undefined): Conn {
  const watched = new Map(jobs.map(j => [j.jobId, j.kind]))
  let controller: AbortController | null = null
  let ended = false
  let generation = 0
  const end = (fatal: Error | null): void => {
    if (ended) return
    ended = true
    controller?.abort()
    on.down(fatal)
  }
  const start = async (): Promise<void> => {
    const mine = ++generation
    controller?.abort()
    const abort = new AbortController()
    controller = abort
    const url = new URL(ctx.ssePath, ctx.baseUrl)
    url.searchParams.set('jobs', [...watched.keys()].join(','))
    const last = lastEventId?.()
    let res: Response
    try {
      res = await ctx.fetch(url, { headers: { accept: 'text/event-stream', ...authHeaders(ctx), ...(last !== undefined ? { 'last-event-id': last } : {}) }, credentials: ctx.credentials, signal: abort.signal })
    } catch {
      if (mine === generation) end(null)
      return
    }
    if (mine !== generation) return
    if (res.status === 401) return end(new AuthError('authentication required'))
    if (res.status === 204) return end(null)
    const type = res.headers.get('content-type') ?? ''
    if (res.status !== 200 || !type.startsWith('text/event-stream') || res.body === null) {
      await res.body?.cancel().catch(() => {})
      return end(res.status === 400 || res.status === 429 ? new ConnectionError(res.status, await Promise.resolve('request refused')) : null)
    }
    on.live()
    const parser = new SseParser()
    const decoder = new TextDecoder()
    const reader = res.body.getReader()
    let closeCode: number | null = null
    try {
      for (;;) {
        const { done, value } = await reader.read()
        if (done) break
        on.touch()
        for (const e of parser.push(decoder.decode(value, { stream: true }))) {
          let data: any
          try { data = JSON.parse(e.data) } catch { continue }
          if (e.event === 'job_update') on.update(data, watched.get(data.job_id))
          else if (e.event === 'error' && typeof data.job_id === 'string') on.notFound(data.job_id, String(data.message))
          else if (e.event === 'close') closeCode = e.id === SSE_DONE_ID ? CloseCodes.normal : Number(data.code)
        }
      }
    } catch {}
    if (mine !== generation) return
    end(closeCode !== null && !shouldRetry(closeCode) && closeCode !== CloseCodes.normal ? new ConnectionError(closeCode, 'closed by the server') : null)
  }
  // Jobs watched in one go (a page opening with 50) make one request, not 50 in a row.
  let pending: ReturnType<typeof setTimeout> | null = null
  const restart = (): void => {
    if (pending !== null || ended) return
    pending = setTimeout(() => { pending = null; if (!ended) void start() }, 0)
  }
  restart()
  return {
    add (more) {
      let changed = false
      for (const { kind, jobId } of more) {
        if (!watched.has(jobId)) { watched.set(jobId, kind); changed = true }
      }
      if (changed) restart()
    },
    remove (jobId) {
      // The stream ends by itself once the jobs it names have ended; a job no longer wanted is
      // only ignored, so removing one costs no new request.
      watched.delete(jobId)
    },
    close () {
      ended = true
      generation++
      if (pending !== null) clearTimeout(pending)
      controller?.abort()
    }
  }
}

const POLL_STATUS = { processing: 'running', complete: 'succeeded', failed: 'failed', cancelled: 'cancelled' } as const

/** The status route of each job, every `pollIntervalMs`: the transport that always works. */
export function openPolling (ctx: ConnContext, jobs: Array<{ kind: string, jobId: string }>, on: ConnHandlers): Conn {
  const watched = new Map(jobs.map(j => [j.jobId, j.kind]))
  let ended = false
  let timer: ReturnType<typeof setTimeout> | null = null
  let wentLive = false
  const end = (fatal: Error | null): void => {
    if (ended) return
    ended = true
    if (timer !== null) clearTimeout(timer)
    on.down(fatal)
  }
  const get = async (path: string): Promise<Response> => await ctx.fetch(new URL(path, ctx.baseUrl), { headers: authHeaders(ctx), credentials: ctx.credentials })
  const round = async (): Promise<void> => {
    for (const [jobId, kind] of [...watched]) {
      if (ended) return
      let res: Response
      try { res = await get(ctx.statusPath(kind, jobId)) } catch { return end(null) }
      if (res.status === 401) return end(new AuthError('authentication required'))
      if (res.status === 404) {
        watched.delete(jobId)
        on.notFound(jobId, 'Job not found or access denied')
        continue
      }
      if (res.status !== 200) return end(null)
      if (!wentLive) { wentLive = true; on.live() }
      on.touch()
      const p = await res.json() as ProgressMessage
      let result: unknown = null
      if (p.status === 'complete') {
        try {
          const r = await get(ctx.resultPath(kind, jobId))
          if (r.status === 200) result = ((await r.json()) as { result: unknown }).result
        } catch {}
      }
      on.update({ type: 'job_update', job_id: jobId, status: POLL_STATUS[p.status], result, error: p.error ?? null, progress: p.progress, processed: p.processed, total: p.total, eta_seconds: p.eta_seconds, ts: Math.floor(Date.now() / 1000) }, kind)
      if (p.status !== 'processing') watched.delete(jobId)
    }
    if (!ended) timer = setTimeout(() => { void round() }, ctx.pollIntervalMs)
  }
  void round()
  return {
    add (more) { for (const { kind, jobId } of more) watched.set(jobId, kind) },
    remove (jobId) { watched.delete(jobId) },
    close () {
      ended = true
      if (timer !== null) clearTimeout(timer)
    }
  }
}
