/**
 * fastify-job-progress/client: watch jobs from a browser or Node ≥ 20. One connection per client
 * whatever the number of watched jobs; WebSocket, else Server-Sent Events, else polling, and back
 * up when the better transport works again; full-jitter backoff; every watched job resubscribed
 * after a reconnect, so no final state is lost; typed errors instead of retry loops.
 */
import { compareVersions } from '../lib/wire/version'
import type { JobUpdateMessage } from '../lib/wire/messages'
import { HttpError, JobFailedError, JobProgressError, NotFoundError } from './errors'
import { authError, parse, transports, type Conn } from './transports'
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

const FINAL = new Set(['succeeded', 'failed', 'cancelled'])

/** One watched job: an async iterable of its updates, its current state, and how it ended. */
export class Watch implements AsyncIterable<JobUpdate> {
  readonly kind: string
  readonly jobId: string
  /** Resolves with the final `succeeded` update; rejects with JobFailedError, NotFoundError or AuthError. */
  readonly done: Promise<JobUpdate>
  current: JobUpdate | null = null
  #listeners = new Set<Listener<JobUpdate>>()
  #settle!: (error?: Error, final?: JobUpdate) => void
  #ended: { error?: Error | undefined } | null = null
  #stop: () => void

  constructor (kind: string, jobId: string, stop: () => void) {
    this.kind = kind
    this.jobId = jobId
    this.#stop = stop
    this.done = new Promise((resolve, reject) => { this.#settle = (error, final) => error !== undefined ? reject(error) : resolve(final as JobUpdate) })
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
    const last = this.current
    if (this.#ended !== null || (last !== null && (
      // The version orders states across transports and instances (a retry is a newer attempt);
      // without one, progress within a status only goes forward.
      u.version !== undefined && last.version !== undefined
        ? compareVersions(u.version, last.version) < 0
        : !FINAL.has(u.status) && u.status === last.status && u.processed < last.processed))) return false
    this.current = u
    for (const fn of this.#listeners) fn(u)
    if (FINAL.has(u.status)) this._end(u.status === 'succeeded' ? undefined : new JobFailedError(u), u)
    return true
  }

  /** @internal */
  _end (error?: Error, final?: JobUpdate): void {
    if (this.#ended !== null) return
    this.#ended = { error }
    this.#settle(error, final)
    for (const fn of this.#listeners) fn(this.current as JobUpdate)
  }

  async * [Symbol.asyncIterator] (): AsyncIterator<JobUpdate> {
    const queue: JobUpdate[] = []
    let wake: (() => void) | undefined
    const off = this.onUpdate((u) => { if (u !== null && queue.at(-1) !== u) queue.push(u); wake?.() })
    try {
      for (;;) {
        while (queue.length > 0) yield queue.shift() as JobUpdate
        const ended = this.#ended
        if (ended !== null) {
          if (ended.error !== undefined && !(ended.error instanceof JobFailedError)) throw ended.error
          return
        }
        await new Promise<void>(resolve => { wake = resolve })
      }
    } finally {
      off()
    }
  }
}

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

/** The client. Create one per page (or process) and share it. */
export class JobProgressClient {
  // The state lives in the constructor's closure (its names minify); the methods call into it.
  readonly #watch: (kind: string, jobId: string) => Watch
  readonly #upload: (kind: string, file: Blob, opts: UploadOptions) => Promise<UploadedJob>
  readonly #cancel: (kind: string, jobId: string) => Promise<void>
  readonly #close: () => void
  readonly #state: () => ConnectionEvent
  readonly #stateListeners = new Set<Listener<ConnectionEvent>>()
  /** Connections opened so far (for tests and diagnostics). */
  connections = 0

  constructor (options: ClientOptions = {}) {
    const g = globalThis as unknown as { location?: { origin: string }, WebSocket?: typeof WebSocket, XMLHttpRequest?: typeof XMLHttpRequest, addEventListener?: (n: string, f: () => void) => void, fetch: typeof fetch }
    const {
      baseUrl = g.location?.origin,
      apiKey,
      apiKeyVia = 'subprotocol',
      credentials = 'same-origin',
      transports: wanted = ['websocket', 'sse', 'polling'],
      wsPath = '/ws/jobs',
      ssePath = '/events',
      paths = {},
      backoff: { minMs = 1000, maxMs = 30_000 } = {},
      fallbackAfter = 2,
      upgradeIntervalMs = 30_000,
      heartbeatTimeoutMs = 75_000,
      pollIntervalMs = 2000,
      fetch: fetchFn = g.fetch.bind(g),
      WebSocket: Ws = g.WebSocket
    } = options
    if (baseUrl === undefined) throw new TypeError('fastify-job-progress/client: `baseUrl` is required outside a browser')
    const route = (name: 'status' | 'result' | 'cancel'): (kind: string, jobId: string) => string => paths[name] ?? ((kind, id) => `/${kind}/${id}/${name}`)
    const headers: Record<string, string> = apiKey !== undefined ? { authorization: `Bearer ${apiKey}` } : {}
    const order = wanted.filter(t => t !== 'websocket' || Ws !== undefined)
    const watches = new Map<string, Watch>()
    const listeners = this.#stateListeners
    let level = 0
    let failures = 0
    let attempt = 0
    let conn: Conn | null = null
    let probe: Conn | null = null
    let connTransport: Transport | null = null
    let live = false
    let retryTimer: ReturnType<typeof setTimeout> | undefined
    let upgradeTimer: ReturnType<typeof setTimeout> | undefined
    let watchdog: ReturnType<typeof setInterval> | undefined
    let lastSeen = 0
    let fatal: Error | null = null
    let state: ConnectionEvent = { state: 'idle', transport: null }
    let lastEventId: string | undefined
    let closed = false
    let sessionStarted = false
    let firstUpload: Promise<unknown> = Promise.resolve()
    const open = transports({ baseUrl, apiKey, apiKeyVia, credentials, fetch: fetchFn, WebSocket: Ws, wsPath, ssePath, statusPath: route('status'), resultPath: route('result'), pollIntervalMs, lastEventId: () => lastEventId })

    const active = (): Watch[] => [...watches.values()].filter(w => !w.ended)

    const setState = (next: ConnectionEvent): void => {
      // Each wait before a reconnect is reported, even when the state stays `reconnecting`.
      if (next.state === state.state && next.transport === state.transport && next.retryInMs === undefined) return
      state = next
      for (const fn of listeners) fn(next)
    }

    /** The connection is gone (the timers that depend on it too). */
    const dropConn = (): void => {
      conn = null
      live = false
      clearInterval(watchdog)
    }

    const teardown = (): void => {
      clearTimeout(retryTimer)
      clearTimeout(upgradeTimer)
      retryTimer = upgradeTimer = undefined
      const old = [conn, probe]
      dropConn()
      probe = connTransport = null
      for (const c of old) c?.close()
    }

    const idle = (): void => setState({ state: 'idle', transport: null })

    /** A job ended or was dropped: with nothing left to watch, no connection is held. */
    const settle = (jobId: string): void => {
      if (watches.get(jobId)?.ended === true) watches.delete(jobId)
      if (active().length === 0) {
        teardown()
        idle()
      }
    }

    const fail = (error: Error): void => {
      fatal = error
      teardown()
      for (const w of active()) w._end(error)
      setState({ state: 'offline', transport: null, error })
    }

    const retryLater = (): void => {
      // Full jitter: anywhere between 0 and the exponential step.
      const delay = Math.floor(Math.random() * Math.min(maxMs, minMs * 2 ** attempt++))
      setState({ state: 'reconnecting', transport: connTransport, retryInMs: delay })
      retryTimer = setTimeout(() => { retryTimer = undefined; connectNow() }, delay)
    }

    const onUpdate = (m: JobUpdateMessage, kind?: string): void => {
      const watch = watches.get(m.job_id)
      if (watch === undefined) return
      if (m.version !== undefined) lastEventId = `${m.job_id}@${m.version}`
      const u: JobUpdate = { kind: kind ?? watch.kind, jobId: m.job_id, status: m.status, progress: m.progress, processed: m.processed, total: m.total, etaSeconds: m.eta_seconds, result: m.result ?? null, error: m.error ?? null }
      for (const k of ['version', 'stage', 'message', 'data'] as const) if (m[k] !== undefined) (u as unknown as Record<string, unknown>)[k] = m[k]
      watch._update(u)
    }

    /** Opens `transport`; as a probe, it takes over from the fallback only once it is live. */
    const connect = (transport: Transport, probing: boolean): void => {
      let wasLive = false
      this.connections++
      const c = open(transport, active(), {
        live: () => {
          wasLive = true
          if (probing) {
            // The better transport works: it takes over, and the fallback goes.
            probing = false
            probe = null
            conn?.close()
            level = 0
          }
          conn = c
          connTransport = transport
          live = true
          failures = attempt = 0
          lastSeen = Date.now()
          setState({ state: transport === 'websocket' ? 'live' : 'fallback', transport })
          startWatchdog()
          if (level > 0) scheduleUpgrade()
        },
        touch: () => { lastSeen = Date.now() },
        update: onUpdate,
        // The server names the job in its errors: not found, or a limit such as subscriptions.
        notFound: (jobId, message) => watches.get(jobId)?._end(/not found/i.test(message) ? new NotFoundError(jobId, message) : new JobProgressError(message)),
        down: (error) => {
          if (probing) {
            probe = null
            return scheduleUpgrade()
          }
          dropConn()
          if (error !== null) return fail(error)
          if (active().length === 0) return
          if (!wasLive && ++failures >= fallbackAfter && level < order.length - 1) {
            level++
            failures = 0
            // A new transport is tried at once: the old one's failure says nothing about it.
            return connectNow()
          }
          retryLater()
        }
      })
      if (probing) probe = c
      else {
        conn = c
        connTransport = transport
      }
    }

    const connectNow = (): void => {
      const transport = order[Math.min(level, order.length - 1)]
      if (closed || fatal !== null || active().length === 0 || transport === undefined) return
      setState({ state: state.state === 'idle' ? 'connecting' : state.state, transport })
      connect(transport, false)
    }

    const startWatchdog = (): void => {
      clearInterval(watchdog)
      watchdog = setInterval(() => {
        // Silent for too long: the connection is dead without having said so.
        if (Date.now() - lastSeen <= heartbeatTimeoutMs || conn === null) return
        conn.close()
        dropConn()
        retryLater()
      }, Math.min(5_000, heartbeatTimeoutMs / 2))
      ;(watchdog as { unref?: () => void }).unref?.()
    }

    /** While on a fallback, try the best transport now and then; switch once it is live. */
    const scheduleUpgrade = (): void => {
      clearTimeout(upgradeTimer)
      upgradeTimer = setTimeout(() => {
        upgradeTimer = undefined
        if (live && level > 0) connect(order[0], true)
      }, upgradeIntervalMs / 2 * (1 + Math.random()))
      ;(upgradeTimer as { unref?: () => void }).unref?.()
    }

    /** Checks an HTTP answer; its JSON body, or the error it means. */
    const answer = (status: number, text: string, what: string, jobId?: string): any => {
      const body = parse(text)
      if (status === 401) throw authError(body?.message)
      if (status === 404 && jobId !== undefined) throw new NotFoundError(jobId)
      if (status < 200 || status > 299) throw new HttpError(status, body?.message ?? `${what} failed (${status})`, body)
      return body
    }

    const send = async (kind: string, file: Blob, opts: UploadOptions): Promise<UploadedJob> => {
      const form = new FormData()
      for (const [k, v] of Object.entries(opts.fields ?? {})) form.append(k, v)
      form.append('file', file, opts.filename ?? (file as { name?: string }).name ?? 'upload')
      const url = new URL(paths.upload?.(kind) ?? `/${kind}/upload`, baseUrl).toString()
      const XHR = g.XMLHttpRequest
      const progress = opts.onUploadProgress
      let status: number
      let text: string
      if (XHR !== undefined && progress !== undefined) {
        // Only XMLHttpRequest reports upload progress in browsers.
        ({ status, text } = await new Promise<{ status: number, text: string }>((resolve, reject) => {
          const xhr = new XHR()
          xhr.open('POST', url)
          xhr.withCredentials = credentials === 'include'
          for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v)
          xhr.upload.onprogress = (e) => progress(e.loaded, e.lengthComputable ? e.total : file.size)
          xhr.onload = () => resolve({ status: xhr.status, text: xhr.responseText })
          xhr.onerror = () => reject(new HttpError(0, 'upload failed: network error'))
          xhr.onabort = () => reject(new DOMException('upload aborted', 'AbortError'))
          opts.signal?.addEventListener('abort', () => xhr.abort(), { once: true })
          xhr.send(form)
        }))
      } else {
        progress?.(0, file.size)
        const res = await fetchFn(url, { method: 'POST', body: form, headers, credentials, ...(opts.signal !== undefined ? { signal: opts.signal } : {}) })
        status = res.status
        text = await res.text()
        progress?.(file.size, file.size)
      }
      const body = answer(status, text, 'upload')
      const jobId = String(body.job_id)
      return { kind, jobId, statusUrl: String(body.status_url), watch: () => this.watch(kind, jobId) }
    }

    this.#upload = async (kind, file, opts) => {
      if (apiKey !== undefined || sessionStarted) return await send(kind, file, opts)
      // With cookie sessions the first upload starts the session: several first uploads at once
      // would start several, and the page would own only the last one's jobs. Until one upload
      // went through, they go one at a time.
      const job = firstUpload.then(async () => await send(kind, file, opts))
      firstUpload = job.then(() => { sessionStarted = true }, () => {})
      return await job
    }

    this.#cancel = async (kind, jobId) => {
      const res = await fetchFn(new URL(route('cancel')(kind, jobId), baseUrl), { method: 'POST', headers, credentials })
      answer(res.status, await res.text(), 'cancel', jobId)
    }

    this.#watch = (kind, jobId) => {
      let watch = watches.get(jobId)
      if (watch !== undefined) return watch
      watch = new Watch(kind, jobId, () => {
        watches.delete(jobId)
        conn?.remove(jobId)
        settle(jobId)
      })
      watches.set(jobId, watch)
      const ended = (): void => settle(jobId)
      void watch.done.then(ended, ended)
      if (fatal !== null) watch._end(fatal)
      else if (conn !== null) conn.add(kind, jobId)
      else if (retryTimer === undefined) connectNow()
      return watch
    }

    this.#close = () => {
      closed = true
      teardown()
      idle()
    }

    this.#state = () => state
    // The browser knows when the network is gone and back: no point in backing off meanwhile.
    g.addEventListener?.('offline', () => setState({ state: 'offline', transport: null }))
    g.addEventListener?.('online', () => { if (conn === null && active().length > 0) connectNow() })
  }

  /** The connection's state now. */
  get state (): ConnectionEvent {
    return this.#state()
  }

  /** Calls `fn` on every connection state change; returns the unsubscribe. */
  onState (fn: Listener<ConnectionEvent>): () => void {
    this.#stateListeners.add(fn)
    return () => this.#stateListeners.delete(fn)
  }

  /** Watches a job; watching the same job twice returns the same Watch. */
  watch (kind: string, jobId: string): Watch {
    return this.#watch(kind, jobId)
  }

  /** Uploads a file to a kind's upload route; resolves once the job is queued. */
  async upload (kind: string, file: Blob, opts: UploadOptions = {}): Promise<UploadedJob> {
    return await this.#upload(kind, file, opts)
  }

  /** Cancels a job. Rejects with HttpError 409 when it already ended, NotFoundError when not found. */
  async cancel (kind: string, jobId: string): Promise<void> {
    await this.#cancel(kind, jobId)
  }

  /** Closes the connection and stops every timer; watches stay as they are. */
  close (): void {
    this.#close()
  }
}

/** Creates a client (same as `new JobProgressClient(options)`). */
export function createClient (options?: ClientOptions): JobProgressClient {
  return new JobProgressClient(options)
}
