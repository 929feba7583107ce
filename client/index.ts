/**
 * fastify-job-progress/client: watch jobs from a browser or Node ≥ 20. One connection per client
 * whatever the number of watched jobs; WebSocket, else Server-Sent Events, else polling, and back
 * up when the better transport works again; full-jitter backoff; every watched job resubscribed
 * after a reconnect, so no final state is lost; typed errors instead of retry loops.
 */
import { compareVersions } from '../lib/wire/version'
import type { JobUpdateMessage } from '../lib/wire/messages'
import { AuthError, HttpError, JobFailedError, JobProgressError, NotFoundError } from './errors'
import { authHeaders, openPolling, openSse, openWebSocket, type Conn, type ConnContext, type ConnHandlers } from './transports'
import type { ConnectionEvent, JobUpdate, Transport } from './types'

export * from './errors'
export type * from './types'
export { CloseCodes, shouldRetry, CLOSE_ADVICE } from '../lib/wire/close-codes'

export interface ClientOptions {
  /** The API's origin. @default location.origin in a browser */
  baseUrl?: string
  /** An API key: `Authorization: Bearer` on HTTP; on the WebSocket as `apiKeyVia` says. */
  apiKey?: string
  /**
   * How the WebSocket carries `apiKey` (browsers cannot set its headers): a subprotocol, the
   * `api_key` query parameter, or a first `{ "token" }` message (for a `first-message` protocol).
   * @default 'subprotocol'
   */
  apiKeyVia?: 'subprotocol' | 'query' | 'first-message'
  /** fetch's credentials mode: cookie sessions across origins need 'include'. @default 'same-origin' */
  credentials?: RequestCredentials
  /** Transports to use, best first. @default ['websocket', 'sse', 'polling'] */
  transports?: Transport[]
  /** The `jobs` protocol's path. @default '/ws/jobs' */
  wsPath?: string
  /** The multiplexed SSE stream's path. @default '/events' */
  ssePath?: string
  /** Routes of a kind. @default `/<kind>/upload`, `/<kind>/<id>/status`, `/result`, `/cancel` */
  paths?: Partial<{
    upload: (kind: string) => string
    status: (kind: string, jobId: string) => string
    result: (kind: string, jobId: string) => string
    cancel: (kind: string, jobId: string) => string
  }>
  /** Reconnect delays: full jitter between 0 and min(maxMs, minMs × 2^attempt). @default { minMs: 1000, maxMs: 30000 } */
  backoff?: { minMs?: number, maxMs?: number }
  /** Failed attempts on a transport before falling back to the next. @default 2 */
  fallbackAfter?: number
  /** How often to try the better transport again while on a fallback. @default 30000 */
  upgradeIntervalMs?: number
  /** Reconnect when nothing (not even a heartbeat) arrived for this long. @default 75000 */
  heartbeatTimeoutMs?: number
  /** Polling interval. @default 2000 */
  pollIntervalMs?: number
  /** For Node or tests: the implementations to use. @default the globals */
  fetch?: typeof fetch
  WebSocket?: typeof WebSocket
}

type Listener<T> = (value: T) => void

/** One watched job: an async iterable of its updates, its current state, and how it ended. */
export class Watch implements AsyncIterable<JobUpdate> {
  readonly kind: string
  readonly jobId: string
  /** Resolves with the final `succeeded` update; rejects with JobFailedError, NotFoundError or AuthError. */
  readonly done: Promise<JobUpdate>
  current: JobUpdate | null = null
  #listeners = new Set<Listener<JobUpdate>>()
  #resolve!: (u: JobUpdate) => void
  #reject!: (e: Error) => void
  #ended: { error?: Error } | null = null
  #stop: () => void

  constructor (kind: string, jobId: string, stop: () => void) {
    this.kind = kind
    this.jobId = jobId
    this.#stop = stop
    this.done = new Promise((resolve, reject) => { this.#resolve = resolve; this.#reject = reject })
    // Awaiting `done` is optional: an unawaited failure must not crash Node.
    this.done.catch(() => {})
  }

  get ended (): boolean {
    return this.#ended !== null
  }

  /** Calls `fn` with every update (and at once with the current one); returns the unsubscribe. */
  onUpdate (fn: Listener<JobUpdate>): () => void {
    this.#listeners.add(fn)
    if (this.current !== null) fn(this.current)
    return () => this.#listeners.delete(fn)
  }

  /** Stops watching (the connection unsubscribes); `done` stays pending. */
  stop (): void {
    this.#stop()
  }

  /** @internal */
  _update (u: JobUpdate): boolean {
    if (this.#ended !== null) return false
    const last = this.current
    if (last !== null) {
      // The version orders states across transports and instances (a retry is a newer attempt);
      // without one, progress within a status only goes forward.
      const versioned = u.version !== undefined && last.version !== undefined
      if (versioned ? compareVersions(u.version as string, last.version as string) < 0 : !FINAL.has(u.status) && u.status === last.status && u.processed < last.processed) return false
    }
    this.current = u
    for (const fn of this.#listeners) fn(u)
    if (u.status === 'succeeded') this._end(undefined, u)
    else if (FINAL.has(u.status)) this._end(new JobFailedError(u))
    return true
  }

  /** @internal */
  _end (error?: Error, final?: JobUpdate): void {
    if (this.#ended !== null) return
    this.#ended = { error }
    if (error !== undefined) this.#reject(error)
    else this.#resolve(final as JobUpdate)
    for (const fn of this.#listeners) fn(this.current as JobUpdate)
  }

  async * [Symbol.asyncIterator] (): AsyncIterator<JobUpdate> {
    const queue: JobUpdate[] = []
    let wake: (() => void) | null = null
    const off = this.onUpdate((u) => { if (u !== null && queue.at(-1) !== u) queue.push(u); wake?.() })
    try {
      for (;;) {
        while (queue.length > 0) {
          const u = queue.shift() as JobUpdate
          yield u
        }
        if (this.#ended !== null) {
          if (this.#ended.error !== undefined && !(this.#ended.error instanceof JobFailedError)) throw this.#ended.error
          return
        }
        await new Promise<void>(resolve => { wake = resolve })
        wake = null
      }
    } finally {
      off()
    }
  }
}

const FINAL = new Set(['succeeded', 'failed', 'cancelled'])

export interface UploadOptions {
  /** Other form fields, sent before the file. */
  fields?: Record<string, string>
  /** Upload progress (bytes sent, bytes in all). In Node, called once at the end. */
  onUploadProgress?: (loaded: number, total: number) => void
  signal?: AbortSignal
  /** The file's name when `file` is a Blob without one. */
  filename?: string
}

export interface UploadedJob {
  kind: string
  jobId: string
  statusUrl: string
  /** Starts watching the job (same as `client.watch(kind, jobId)`). */
  watch: () => Watch
}

function fullJitter (attempt: number, minMs: number, maxMs: number): number {
  return Math.floor(Math.random() * Math.min(maxMs, minMs * 2 ** attempt))
}

/** The client. Create one per page (or process) and share it. */
export class JobProgressClient {
  readonly #opts: Required<Omit<ClientOptions, 'apiKey' | 'WebSocket' | 'paths' | 'backoff'>> & { apiKey?: string, WebSocket?: typeof WebSocket, backoff: { minMs: number, maxMs: number } }
  readonly #ctx: ConnContext
  readonly #paths: Required<NonNullable<ClientOptions['paths']>>
  readonly #watches = new Map<string, Watch>()
  readonly #stateListeners = new Set<Listener<ConnectionEvent>>()
  #order: Transport[]
  #level = 0
  #failures = 0
  #attempt = 0
  #conn: Conn | null = null
  #connTransport: Transport | null = null
  #live = false
  #retryTimer: ReturnType<typeof setTimeout> | null = null
  #upgradeTimer: ReturnType<typeof setTimeout> | null = null
  #watchdog: ReturnType<typeof setInterval> | null = null
  #lastSeen = 0
  #fatal: Error | null = null
  #state: ConnectionEvent = { state: 'idle', transport: null }
  #lastEventId: string | undefined
  #closed = false
  #sessionStarted = false
  #firstUpload: Promise<void> = Promise.resolve()
  /** Connections opened so far (for tests and diagnostics). */
  connections = 0

  constructor (options: ClientOptions = {}) {
    const g = globalThis as unknown as { location?: { origin: string }, WebSocket?: typeof WebSocket, addEventListener?: (n: string, f: () => void) => void }
    const baseUrl = options.baseUrl ?? g.location?.origin
    if (baseUrl === undefined) throw new TypeError('fastify-job-progress/client: `baseUrl` is required outside a browser')
    this.#opts = {
      baseUrl,
      apiKeyVia: options.apiKeyVia ?? 'subprotocol',
      credentials: options.credentials ?? 'same-origin',
      transports: options.transports ?? ['websocket', 'sse', 'polling'],
      wsPath: options.wsPath ?? '/ws/jobs',
      ssePath: options.ssePath ?? '/events',
      backoff: { minMs: options.backoff?.minMs ?? 1000, maxMs: options.backoff?.maxMs ?? 30_000 },
      fallbackAfter: options.fallbackAfter ?? 2,
      upgradeIntervalMs: options.upgradeIntervalMs ?? 30_000,
      heartbeatTimeoutMs: options.heartbeatTimeoutMs ?? 75_000,
      pollIntervalMs: options.pollIntervalMs ?? 2000,
      fetch: options.fetch ?? globalThis.fetch.bind(globalThis),
      ...(options.apiKey !== undefined ? { apiKey: options.apiKey } : {}),
      ...(options.WebSocket ?? g.WebSocket ? { WebSocket: options.WebSocket ?? g.WebSocket } : {})
    }
    this.#paths = {
      upload: options.paths?.upload ?? ((kind) => `/${kind}/upload`),
      status: options.paths?.status ?? ((kind, id) => `/${kind}/${id}/status`),
      result: options.paths?.result ?? ((kind, id) => `/${kind}/${id}/result`),
      cancel: options.paths?.cancel ?? ((kind, id) => `/${kind}/${id}/cancel`)
    }
    this.#order = this.#opts.transports.filter(t => t !== 'websocket' || this.#opts.WebSocket !== undefined)
    this.#ctx = { ...this.#opts, statusPath: this.#paths.status, resultPath: this.#paths.result }
    // The browser knows when the network is gone and back: no point in backing off meanwhile.
    g.addEventListener?.('offline', () => this.#setState({ state: 'offline', transport: null }))
    g.addEventListener?.('online', () => { if (this.#conn === null && this.#active().length > 0) this.#connectNow() })
  }

  /** The connection's state now. */
  get state (): ConnectionEvent {
    return this.#state
  }

  /** Calls `fn` on every connection state change; returns the unsubscribe. */
  onState (fn: Listener<ConnectionEvent>): () => void {
    this.#stateListeners.add(fn)
    return () => this.#stateListeners.delete(fn)
  }

  /** Watches a job; watching the same job twice returns the same Watch. */
  watch (kind: string, jobId: string): Watch {
    const existing = this.#watches.get(jobId)
    if (existing !== undefined) return existing
    const watch = new Watch(kind, jobId, () => this.#unwatch(jobId))
    this.#watches.set(jobId, watch)
    void watch.done.then(() => this.#settle(jobId), () => this.#settle(jobId))
    if (this.#fatal !== null) {
      watch._end(this.#fatal)
      return watch
    }
    if (this.#conn !== null) this.#conn.add([{ kind, jobId }])
    else if (this.#retryTimer === null) this.#connectNow()
    return watch
  }

  /** Uploads a file to a kind's upload route; resolves once the job is queued. */
  async upload (kind: string, file: Blob, opts: UploadOptions = {}): Promise<UploadedJob> {
    // With cookie sessions the first upload starts the session: several first uploads at once
    // would start several, and the page would own only the last one's jobs. Until one upload
    // went through, they go one at a time.
    if (this.#opts.apiKey === undefined && !this.#sessionStarted) {
      const previous = this.#firstUpload
      let release!: () => void
      this.#firstUpload = new Promise<void>(resolve => { release = resolve })
      await previous
      try {
        const job = await this.#upload(kind, file, opts)
        this.#sessionStarted = true
        return job
      } finally {
        release()
      }
    }
    return await this.#upload(kind, file, opts)
  }

  async #upload (kind: string, file: Blob, opts: UploadOptions): Promise<UploadedJob> {
    const form = new FormData()
    for (const [k, v] of Object.entries(opts.fields ?? {})) form.append(k, v)
    const name = opts.filename ?? (file as { name?: string }).name ?? 'upload'
    form.append('file', file, name)
    const url = new URL(this.#paths.upload(kind), this.#opts.baseUrl).toString()
    const XHR = (globalThis as unknown as { XMLHttpRequest?: typeof XMLHttpRequest }).XMLHttpRequest
    let status: number
    let text: string
    if (XHR !== undefined && opts.onUploadProgress !== undefined) {
      // Only XMLHttpRequest reports upload progress in browsers.
      ({ status, text } = await new Promise<{ status: number, text: string }>((resolve, reject) => {
        const xhr = new XHR()
        xhr.open('POST', url)
        xhr.withCredentials = this.#opts.credentials === 'include'
        for (const [k, v] of Object.entries(authHeaders(this.#ctx))) xhr.setRequestHeader(k, v)
        xhr.upload.onprogress = (e) => opts.onUploadProgress?.(e.loaded, e.lengthComputable ? e.total : file.size)
        xhr.onload = () => resolve({ status: xhr.status, text: xhr.responseText })
        xhr.onerror = () => reject(new HttpError(0, 'upload failed: network error'))
        xhr.onabort = () => reject(new DOMException('upload aborted', 'AbortError'))
        opts.signal?.addEventListener('abort', () => xhr.abort(), { once: true })
        xhr.send(form)
      }))
    } else {
      opts.onUploadProgress?.(0, file.size)
      const res = await this.#opts.fetch(url, { method: 'POST', body: form, headers: authHeaders(this.#ctx), credentials: this.#opts.credentials, ...(opts.signal !== undefined ? { signal: opts.signal } : {}) })
      status = res.status
      text = await res.text()
      opts.onUploadProgress?.(file.size, file.size)
    }
    let body: any = null
    try { body = JSON.parse(text) } catch {}
    if (status === 401) throw new AuthError(body?.message ?? 'authentication required')
    if (status < 200 || status >= 300) throw new HttpError(status, body?.message ?? `upload failed (${status})`, body)
    const jobId = String(body.job_id)
    return { kind, jobId, statusUrl: String(body.status_url), watch: () => this.watch(kind, jobId) }
  }

  /** Cancels a job. Rejects with HttpError 409 when it already ended, NotFoundError when not found. */
  async cancel (kind: string, jobId: string): Promise<void> {
    const res = await this.#opts.fetch(new URL(this.#paths.cancel(kind, jobId), this.#opts.baseUrl), { method: 'POST', headers: authHeaders(this.#ctx), credentials: this.#opts.credentials })
    let body: any = null
    try { body = await res.json() } catch {}
    if (res.status === 401) throw new AuthError(body?.message ?? 'authentication required')
    if (res.status === 404) throw new NotFoundError(jobId)
    if (res.status < 200 || res.status >= 300) throw new HttpError(res.status, body?.message ?? `cancel failed (${res.status})`, body)
  }

  /** Closes the connection and stops every timer; watches stay as they are. */
  close (): void {
    this.#closed = true
    this.#teardown()
    this.#setState({ state: 'idle', transport: null })
  }

  #active (): Watch[] {
    return [...this.#watches.values()].filter(w => !w.ended)
  }

  #unwatch (jobId: string): void {
    this.#watches.delete(jobId)
    this.#conn?.remove(jobId)
    this.#settle(jobId)
  }

  /** A job ended or was dropped: with nothing left to watch, no connection is held. */
  #settle (jobId: string): void {
    const w = this.#watches.get(jobId)
    if (w !== undefined && w.ended) this.#watches.delete(jobId)
    if (this.#active().length === 0) {
      this.#teardown()
      this.#setState({ state: 'idle', transport: null })
    }
  }

  #teardown (): void {
    for (const timer of [this.#retryTimer, this.#upgradeTimer]) if (timer !== null) clearTimeout(timer)
    if (this.#watchdog !== null) clearInterval(this.#watchdog)
    this.#retryTimer = this.#upgradeTimer = this.#watchdog = null
    const conn = this.#conn
    this.#conn = null
    this.#connTransport = null
    this.#live = false
    conn?.close()
  }

  #setState (next: ConnectionEvent): void {
    // Each wait before a reconnect is reported, even when the state stays `reconnecting`.
    if (next.state === this.#state.state && next.transport === this.#state.transport && next.retryInMs === undefined) return
    this.#state = next
    for (const fn of this.#stateListeners) fn(next)
  }

  #connectNow (): void {
    if (this.#closed || this.#fatal !== null) return
    const jobs = this.#active().map(w => ({ kind: w.kind, jobId: w.jobId }))
    if (jobs.length === 0) return
    const transport = this.#order[Math.min(this.#level, this.#order.length - 1)]
    if (transport === undefined) return
    this.#setState({ state: this.#state.state === 'idle' ? 'connecting' : this.#state.state, transport })
    this.connections++
    this.#connTransport = transport
    this.#conn = this.#open(transport, jobs, this.#handlers(transport, false))
  }

  #open (transport: Transport, jobs: Array<{ kind: string, jobId: string }>, on: ConnHandlers): Conn {
    if (transport === 'websocket') return openWebSocket(this.#ctx, jobs, on)
    if (transport === 'sse') return openSse(this.#ctx, jobs, on, () => this.#lastEventId)
    return openPolling(this.#ctx, jobs, on)
  }

  #handlers (transport: Transport, probe: boolean): ConnHandlers {
    let wasLive = false
    return {
      live: () => {
        wasLive = true
        if (probe) return
        this.#live = true
        this.#failures = 0
        this.#attempt = 0
        this.#lastSeen = Date.now()
        this.#setState({ state: transport === 'websocket' ? 'live' : 'fallback', transport })
        this.#startWatchdog()
        if (this.#level > 0) this.#scheduleUpgrade()
      },
      touch: () => { this.#lastSeen = Date.now() },
      update: (m, kindHint) => this.#onUpdate(m, kindHint),
      // The server names the job in its errors: not found, or a limit such as subscriptions.
      notFound: (jobId, message) => this.#watches.get(jobId)?._end(/not found/i.test(message) ? new NotFoundError(jobId, message) : new JobProgressError(message)),
      down: (fatal) => {
        if (probe) return
        this.#conn = null
        this.#live = false
        if (this.#watchdog !== null) clearInterval(this.#watchdog)
        this.#watchdog = null
        if (fatal !== null) return this.#fail(fatal)
        if (this.#active().length === 0) return
        if (!wasLive && ++this.#failures >= this.#opts.fallbackAfter && this.#level < this.#order.length - 1) {
          this.#level++
          this.#failures = 0
          // A new transport is tried at once: the old one's failure says nothing about it.
          return this.#connectNow()
        }
        this.#retryLater()
      }
    }
  }

  #retryLater (): void {
    const delay = fullJitter(this.#attempt++, this.#opts.backoff.minMs, this.#opts.backoff.maxMs)
    this.#setState({ state: 'reconnecting', transport: this.#connTransport, retryInMs: delay })
    this.#retryTimer = setTimeout(() => { this.#retryTimer = null; this.#connectNow() }, delay)
  }

  #onUpdate (m: JobUpdateMessage, kindHint?: string): void {
    const watch = this.#watches.get(m.job_id)
    if (watch === undefined) return
    if (m.version !== undefined && m.type === 'job_update') this.#lastEventId = `${m.job_id}@${m.version}`
    watch._update({
      kind: kindHint ?? watch.kind,
      jobId: m.job_id,
      status: m.status,
      progress: m.progress,
      processed: m.processed,
      total: m.total,
      etaSeconds: m.eta_seconds,
      result: m.result ?? null,
      error: m.error ?? null,
      ...(m.version !== undefined ? { version: m.version } : {}),
      ...(m.stage !== undefined ? { stage: m.stage } : {}),
      ...(m.message !== undefined ? { message: m.message } : {}),
      ...(m.data !== undefined ? { data: m.data } : {})
    })
  }

  #fail (error: Error): void {
    this.#fatal = error
    this.#teardown()
    for (const w of this.#active()) w._end(error)
    this.#setState({ state: 'offline', transport: null, error })
  }

  #startWatchdog (): void {
    if (this.#watchdog !== null) clearInterval(this.#watchdog)
    this.#watchdog = setInterval(() => {
      if (Date.now() - this.#lastSeen <= this.#opts.heartbeatTimeoutMs) return
      // Silent for too long: the connection is dead without having said so.
      const conn = this.#conn
      conn?.close()
      if (conn !== null) this.#handlersDown()
    }, Math.min(5_000, this.#opts.heartbeatTimeoutMs / 2))
    ;(this.#watchdog as { unref?: () => void }).unref?.()
  }

  #handlersDown (): void {
    this.#conn = null
    this.#live = false
    if (this.#watchdog !== null) clearInterval(this.#watchdog)
    this.#watchdog = null
    this.#retryLater()
  }

  /** While on a fallback, try the best transport now and then; switch once it is live. */
  #scheduleUpgrade (): void {
    if (this.#upgradeTimer !== null) clearTimeout(this.#upgradeTimer)
    const delay = this.#opts.upgradeIntervalMs / 2 + Math.random() * this.#opts.upgradeIntervalMs / 2
    this.#upgradeTimer = setTimeout(() => {
      this.#upgradeTimer = null
      if (!this.#live || this.#level === 0) return
      const jobs = this.#active().map(w => ({ kind: w.kind, jobId: w.jobId }))
      const best = this.#order[0]
      let probe: Conn | null = null
      const handlers = this.#handlers(best, true)
      handlers.live = () => {
        // The better transport works: it takes over, and the fallback goes.
        const old = this.#conn
        this.#conn = null
        old?.close()
        this.#level = 0
        this.#failures = 0
        this.#connTransport = best
        this.#conn = probe
        probe = null
        const real = this.#handlers(best, false)
        // Re-point the probe's reports at the real handlers.
        Object.assign(handlers, real)
        real.live()
      }
      handlers.down = () => { if (probe !== null) { probe = null; this.#scheduleUpgrade() } }
      this.connections++
      probe = this.#open(best, jobs, handlers)
    }, delay)
    ;(this.#upgradeTimer as { unref?: () => void }).unref?.()
  }
}

/** Creates a client (same as `new JobProgressClient(options)`). */
export function createClient (options?: ClientOptions): JobProgressClient {
  return new JobProgressClient(options)
}
