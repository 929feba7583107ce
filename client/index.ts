/**
 * fastify-job-progress/client: watch jobs from a browser or Node ≥ 20. One connection per client
 * whatever the number of watched jobs; WebSocket, else Server-Sent Events, else polling, and back
 * up when the better transport works again; full-jitter backoff; every watched job resubscribed
 * after a reconnect, so no final state is lost; typed errors instead of retry loops.
 */
import { shouldRetry } from '../lib/wire/close-codes'
import type { JobStatus, JobUpdateMessage, ProgressMessage } from '../lib/wire/messages'
import { AuthError, ConnectionError, HttpError, NotFoundError } from './errors'
import type { ClientOptions, ConnectionEvent, Transport, UploadOptions } from './types'
import { Watch, type UploadedJob } from './watch'
import { MyJobs, type MyJobsFilter } from './my-jobs'

export * from './errors'
export type * from './types'
export { Watch }
export type { UploadedJob } from './watch'
export { MyJobs }
export type { MyJob, MyJobsFilter } from './my-jobs'
export { CloseCodes, shouldRetry, CLOSE_ADVICE } from '../lib/wire/close-codes'

type Listener<T> = (value: T) => void
type Timer = ReturnType<typeof setTimeout> | undefined

/** One connection, whatever its transport. */
interface Conn {
  /** Watch this job too (`again`: it asks for more now, its log lines); `''` is the caller's jobs feed. */
  add: (kind: string, jobId: string, again?: boolean) => void
  remove: (jobId: string) => void
  /** Ends the connection without reporting it down. */
  close: () => void
}

/** JSON text to a value; null when it is not JSON. */
const parse = (text: string): any => {
  try { return JSON.parse(text) } catch { return null }
}

const authError = (reason?: string): AuthError => new AuthError(reason || 'authentication required')

/** What a close code means for the client: null to reconnect, else the error that ends the connection's watches. */
const closeError = (code: number, reason: string): Error | null =>
  code === 4001 ? authError(reason) : shouldRetry(code) || code === 1000 ? null : new ConnectionError(code, reason)

/** The status route's seed statuses in the `jobs` protocol's words (`failed` and `cancelled` are the same). */
const POLL_STATUS: Record<string, JobStatus> = { processing: 'running', complete: 'succeeded' }

/**
 * The client. Create one per page (or process) and share it.
 *
 * Its state lives in the constructor's closure, where names minify; the methods call into it.
 */
export class JobProgressClient {
  readonly #watch: (kind: string, jobId: string) => Watch
  readonly #upload: (kind: string, file: Blob, opts: UploadOptions) => Promise<UploadedJob>
  readonly #cancel: (kind: string, jobId: string) => Promise<void>
  readonly #myJobs: (filter: MyJobsFilter) => MyJobs
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
      transports = ['websocket', 'sse', 'polling'],
      wsPath = '/ws/jobs',
      ssePath = '/job-progress/events',
      paths = {},
      backoff: { minMs = 1000, maxMs = 30_000 } = {},
      fallbackAfter = 2,
      upgradeIntervalMs = 30_000,
      heartbeatTimeoutMs = 75_000,
      pollIntervalMs = 2000,
      myJobsPath = '/job-progress/jobs',
      fetch: fetchFn = g.fetch.bind(g),
      WebSocket: Ws = g.WebSocket
    } = options
    if (!baseUrl) throw new TypeError('baseUrl required')
    const route = (name: 'status' | 'result' | 'cancel', kind: string, id: string): URL => new URL(paths[name]?.(kind, id) ?? `/${kind}/${id}/${name}`, baseUrl)
    const headers: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {}
    const order = transports.filter(t => t !== 'websocket' || Ws)
    const watches = new Map<string, Watch>()
    /** The open lists of the caller's jobs: while there is one, the connection follows the feed. */
    const feeds = new Set<MyJobs>()
    const listeners = this.#stateListeners
    let level = 0
    let failures = 0
    let attempt = 0
    let conn: Conn | null = null
    let probe: Conn | null = null
    let isLive = false
    let retryTimer: Timer
    let upgradeTimer: Timer
    let watchdog: Timer
    let lastSeen = 0
    /** After a refusal for too many connections, no new one before this time. */
    let pausedUntil = 0
    let state: ConnectionEvent = { state: 'idle', transport: null }
    let lastEventId: string | undefined
    let closed = false
    let sessionStarted = false
    let firstUpload: Promise<unknown> = Promise.resolve()

    const active = (): Watch[] => [...watches.values()].filter(w => !w.ended)
    /** What a connection carries: each active watch's job and kind, and the feed (`''`) while a list follows it. */
    const want = (): Array<[string, string]> => active().map((w): [string, string] => [w.jobId, w.kind]).concat(feeds.size ? [['', '']] : [])

    const setState = (name: ConnectionEvent['state'], transport: Transport | null = null, extra?: { retryInMs?: number, error?: Error }): void => {
      // Each wait before a reconnect is reported, even when the state stays `reconnecting`.
      if (name === state.state && transport === state.transport && !extra) return
      state = { state: name, transport, ...extra }
      for (const fn of listeners) fn(state)
    }

    /** The connection is gone (the watchdog with it). */
    const dropConn = (): void => {
      conn = null
      isLive = false
      clearInterval(watchdog)
    }

    const teardown = (): void => {
      clearTimeout(retryTimer)
      clearTimeout(upgradeTimer)
      retryTimer = undefined
      conn?.close()
      probe?.close()
      dropConn()
      probe = null
    }

    /** A job ended or was dropped: with nothing left to watch, no connection is held. */
    const settle = (jobId: string): void => {
      if (watches.get(jobId)?.ended) watches.delete(jobId)
      if (!want().length) {
        teardown()
        setState('idle')
      }
    }

    // Full jitter: anywhere between 0 and the exponential step.
    const backoffDelay = (): number => Math.random() * Math.min(maxMs, minMs * 2 ** attempt++) | 0

    /**
     * A refusal that a retry cannot fix ends the watches the connection carried, and only those:
     * the client is not broken by it. The next watch connects again, with new credentials or a
     * new session; after too many connections (1008, 429), once a backoff has passed.
     */
    const fail = (error: Error, jobIds: Iterable<string>): void => {
      teardown()
      // An expired session: the next uploads start a new one, one at a time again.
      if (error instanceof AuthError) sessionStarted = false
      if ((error as ConnectionError).code === 1008 || (error as ConnectionError).code === 429) pausedUntil = Date.now() + minMs + backoffDelay()
      setState('offline', null, { error })
      for (const id of jobIds) id ? watches.get(id)?._end(error) : feeds.forEach(f => f._end(error))
      // Watches made since the connection opened were not refused yet: they try on their own.
      connectNow()
    }

    const retryLater = (delay = backoffDelay()): void => {
      setState('reconnecting', order[level], { retryInMs: delay })
      retryTimer = setTimeout(() => { retryTimer = undefined; connectNow() }, delay)
    }

    const touch = (): void => { lastSeen = Date.now() }

    /** A request with the client's credentials. */
    const request = async (url: URL, init?: RequestInit): Promise<Response> => await fetchFn(url, { headers, credentials, ...init })

    const onUpdate = (m: JobUpdateMessage): void => {
      const watch = watches.get(m.job_id)
      if (!watch) return
      // The message's fields under the client's names; any field a newer server adds passes through.
      const { type, ts, job_id: jobId, eta_seconds: etaSeconds, ...fields } = m
      // The last event id moves with the state held, never to one refused as older.
      if (watch._update({ kind: watch.kind, jobId, ...fields, result: fields.result ?? null, error: fields.error ?? null, etaSeconds }) && m.version) lastEventId = `${m.job_id}@${m.version}`
    }

    /**
     * Opens `transport` for every active watch; as a probe (trying the best transport while on a
     * fallback) it takes over only once it is live. The transports share the watched jobs, the
     * end of a connection and the reading of a message; each adds only how it carries them: the
     * `jobs` protocol over one WebSocket; one multiplexed Server-Sent Events stream read with
     * fetch (so it can carry an API key header and runs in Node too), where adding a job means a
     * new request; or the status route of each job every `pollIntervalMs`, which always works.
     */
    const connect = (transport: Transport, probing: boolean): void => {
      const watched = new Map(want())
      let ended = false
      let wentLive = false
      let timer: Timer
      // What the transport does when a job is added or removed, and when the connection ends.
      let added = (_jobId: string): void => {}
      let removed = added
      let stop = (): void => { clearTimeout(timer) }
      const c: Conn = {
        add (kind, jobId, again) {
          if (again || !watched.has(jobId)) { watched.set(jobId, kind); added(jobId) }
        },
        remove (jobId) {
          if (watched.delete(jobId)) removed(jobId)
        },
        close () {
          ended = true
          stop()
        }
      }
      const live = (): void => {
        if (wentLive) return
        wentLive = true
        if (probing) {
          // The better transport works: it takes over, and the fallback goes.
          probing = false
          probe = null
          conn?.close()
          clearTimeout(retryTimer)
          retryTimer = undefined
          conn = c
          level = 0
          // Jobs watched since the probe opened were given to the old connection only.
          for (const [jobId, kind] of want()) {
            if (!watched.has(jobId)) {
              watched.set(jobId, kind)
              // The WebSocket subscribes every watched job once live (below); SSE needs a new request.
              if (transport !== 'websocket') added(jobId)
            }
          }
        }
        isLive = true
        failures = attempt = 0
        touch()
        setState(transport === 'websocket' ? 'live' : 'fallback', transport)
        startWatchdog()
        if (level) scheduleUpgrade()
      }
      const end = (error: Error | null): void => {
        if (ended) return
        ended = true
        stop()
        if (probing) {
          probe = null
          return scheduleUpgrade()
        }
        dropConn()
        if (error) return fail(error, watched.keys())
        if (!want().length) return
        if (!wentLive && ++failures >= fallbackAfter && level < order.length - 1) {
          level++
          failures = 0
          // A new transport is tried at once: the old one's failure says nothing about it.
          return connectNow()
        }
        retryLater()
      }
      /** A message of the `jobs` protocol, or an SSE event (its `event:` as the type). */
      const dispatch = (type: string, m: any): void => {
        if (!m) return
        if (type === 'job_update') onUpdate(m)
        else if (type === 'close') end(closeError(m.code, m.reason))
        // An error naming a job, its log lines and its stream chunks: its watch reads them; the
        // feed's changes, resyncs and subscription: the lists of the caller's jobs.
        else {
          watches.get(m.job_id)?._msg(type, m)
          for (const f of feeds) f._msg(type, m)
        }
      }
      this.connections++
      if (probing) probe = c
      else conn = c

      if (transport === 'websocket') {
        const url = new URL(wsPath, baseUrl)
        url.protocol = url.protocol.replace('http', 'ws')
        if (apiKey && apiKeyVia === 'query') url.searchParams.set('api_key', apiKey)
        let ws: WebSocket
        try {
          ws = new (Ws as typeof WebSocket)(url, apiKey && apiKeyVia === 'subprotocol' ? [apiKey] : undefined)
        } catch {
          // A key a browser refuses as a subprotocol (`=` or `/` in it): counts as a failure, so the next transport is tried.
          return end(null)
        }
        // Sending on a closing socket does nothing.
        // A watch that wants log lines resumes after the last one it has.
        const send = (action: string) => (jobId: string): void => {
          const w = watches.get(jobId)
          if (wentLive) ws.send(JSON.stringify(jobId ? { action, job_id: jobId, logs: w?.logs ? { from: w.next } : undefined, streams: w?.streams } : { action: action + '_mine' }))
        }
        added = send('subscribe')
        removed = send('unsubscribe')
        // A close event follows every error; an error without a listener would throw in Node's `ws`.
        ws.onerror = () => {}
        ws.onopen = () => {
          if (apiKey && apiKeyVia === 'first-message') ws.send(JSON.stringify({ token: apiKey }))
        }
        ws.onmessage = (e: MessageEvent) => {
          touch()
          const m = parse(e.data)
          if (m?.type !== 'connected') return dispatch(m?.type, m)
          live()
          for (const jobId of watched.keys()) added(jobId)
        }
        ws.onclose = (e: CloseEvent) => end(closeError(e.code, e.reason))
        stop = () => {
          ws.onclose = null
          try { ws.close(1000) } catch {}
        }
      } else if (transport === 'sse') {
        // One stream for the watched jobs (`j`), one for the caller's jobs feed (`''`), each replaced by a newer request.
        const controllers: Record<string, AbortController | undefined> = {}
        const open = async (key: string, url: URL, last?: string): Promise<void> => {
          controllers[key]?.abort()
          const abort = controllers[key] = new AbortController()
          const current = (): boolean => abort === controllers[key]
          // The jobs' stream ends by itself once its jobs have ended: while a feed goes on, no reason to reconnect.
          const over = (error: Error | null): void => { if (current() && (error || !key || active().length)) end(error) }
          let res: Response
          try {
            res = await request(url, { headers: { accept: 'text/event-stream', ...headers, ...(last && { 'last-event-id': last }) }, signal: abort.signal })
          } catch {
            // A stream replaced by a newer request ends quietly.
            return over(null)
          }
          if (!current()) return
          const { status, body } = res
          if (status !== 200 || !body || !/^text\/event-stream/.test(res.headers.get('content-type') as string)) {
            // 204: every job had ended already; 401, 400 and 429: the request is refused as it is, and its body says why.
            const why = status > 399 ? parse(await res.text().catch(() => ''))?.message : body?.cancel().catch(() => {})
            return over(status === 401 ? authError(why) : status === 400 || status === 429 ? new ConnectionError(status, why || 'request refused') : null)
          }
          live()
          const reader = body.pipeThrough(new TextDecoderStream()).getReader()
          let buffer = ''
          try {
            for (;;) {
              const { done, value } = await reader.read()
              if (done) break
              touch()
              const blocks = (buffer + value).split(/\r?\n\r?\n/)
              buffer = blocks.pop() as string
              for (const block of blocks) {
                // The server writes one `data:` line per event (its JSON holds no raw newline).
                // Comments (heartbeats), `id:` and `retry:` are not needed: the client keeps its own
                // last event id (from versions) and its own backoff.
                // Not `.`: it stops at U+2028 and U+2029, which JSON leaves unescaped.
                const [, event, data] = /^event: ?([^\r\n]*)\r?\ndata: ?([^\r\n]*)/m.exec(block) ?? []
                dispatch(event as string, parse(data as string))
              }
            }
          } catch {}
          over(null)
        }
        const start = (): void => {
          const jobs = [...watched.keys()].filter(Boolean)
          if (!jobs.length) return
          const url = new URL(ssePath, baseUrl)
          url.searchParams.set('jobs', jobs + '')
          // Lines from the oldest kept: the watches drop those they have.
          if (active().some(w => w.logs)) url.searchParams.set('logs', '1')
          // Each stream from the next chunk its watch needs.
          const from = active().flatMap(w => Object.entries(w.streams ?? {}).map(([n, o]) => `${w.jobId}@${n}:${o}`))
          if (from.length) url.searchParams.set('streams_from', from + '')
          void open('j', url, lastEventId)
        }
        // Jobs watched in one go (a page opening with 50) make one request, not 50 in a row. The
        // stream ends by itself once the jobs it names have ended; a job no longer wanted is only
        // ignored, so removing one costs no new request. The feed has its own stream, from the
        // start: every list is read again once it is in effect (`subscribed`).
        added = (jobId) => {
          if (!jobId) {
            void open('', new URL(`${myJobsPath}/events`, baseUrl))
            return
          }
          clearTimeout(timer)
          timer = setTimeout(start)
        }
        removed = (jobId) => {
          const abort = controllers[jobId]
          controllers[jobId] = undefined
          abort?.abort()
        }
        if (watched.has('')) added('')
        added('j')
        stop = () => {
          clearTimeout(timer)
          for (const abort of Object.values(controllers)) abort?.abort()
        }
      } else {
        const round = async (): Promise<void> => {
          for (const [jobId, kind] of [...watched]) {
            if (ended) return
            if (!jobId) {
              // No feed here: each round reads the lists again.
              live()
              feeds.forEach(f => f._sync())
              continue
            }
            let res: Response
            try { res = await request(route('status', kind, jobId)) } catch { return end(null) }
            if (ended) return
            if (res.status === 404) {
              watched.delete(jobId)
              watches.get(jobId)?._end(new NotFoundError(jobId))
              continue
            }
            if (res.status !== 200) return end(res.status === 401 ? authError() : null)
            let p: ProgressMessage
            try { p = await res.json() } catch { return end(null) }
            let result: unknown = null
            if (p.status === 'complete') {
              try {
                result = (await (await request(route('result', kind, jobId))).json()).result ?? null
              } catch {}
            }
            if (ended) return
            live()
            touch()
            onUpdate({ ...p, status: POLL_STATUS[p.status] ?? p.status, result, error: p.error ?? null } as unknown as JobUpdateMessage)
            if (p.status !== 'processing') watched.delete(jobId)
          }
          if (!ended) timer = setTimeout(round, pollIntervalMs)
        }
        void round()
      }
    }

    const connectNow = (): void => {
      const transport = order[level]
      if (closed || !want().length || !transport) return
      // One connection at a time: a pending retry or a live one (the browser said it is back online) gives way.
      clearTimeout(retryTimer)
      retryTimer = undefined
      const wait = pausedUntil - Date.now()
      if (wait > 0) return retryLater(wait)
      conn?.close()
      setState(state.state === 'idle' || state.error ? 'connecting' : state.state, transport)
      connect(transport, false)
    }

    const startWatchdog = (): void => {
      clearInterval(watchdog)
      watchdog = setInterval(() => {
        // Silent for too long: the connection is dead without having said so.
        if (Date.now() - lastSeen <= heartbeatTimeoutMs || !conn) return
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
        if (isLive && level) connect(order[0], true)
      }, upgradeIntervalMs / 2 * (1 + Math.random()))
      ;(upgradeTimer as { unref?: () => void }).unref?.()
    }

    /** Checks an HTTP answer; its JSON body, or the error it means. */
    const answer = (status: number, text: string, jobId?: string): any => {
      const body = parse(text)
      if (status === 401) {
        sessionStarted = false
        throw authError(body?.message)
      }
      if (status === 404 && jobId) throw new NotFoundError(jobId)
      if (status < 200 || status > 299) throw new HttpError(status, body?.message ?? `HTTP ${status}`, body)
      return body
    }

    const send = async (kind: string, file: Blob, opts: UploadOptions): Promise<UploadedJob> => {
      opts.signal?.throwIfAborted()
      const form = new FormData()
      for (const [k, v] of Object.entries(opts.fields ?? {})) form.append(k, v)
      form.append('file', file, opts.filename ?? (file as { name?: string }).name ?? 'upload')
      const url = new URL(paths.upload?.(kind) ?? `/${kind}/upload`, baseUrl)
      const XHR = g.XMLHttpRequest
      const progress = opts.onUploadProgress
      let status: number
      let text: string
      if (XHR && progress) {
        // Only XMLHttpRequest reports upload progress in browsers.
        const xhr = new XHR()
        await new Promise((resolve, reject) => {
          xhr.open('POST', url)
          xhr.withCredentials = credentials === 'include'
          for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v)
          xhr.upload.onprogress = (e) => progress(e.loaded, e.lengthComputable ? e.total : file.size)
          // Loaded, failed or aborted: a status of 0 means no answer.
          xhr.onloadend = () => xhr.status ? resolve(0) : reject(opts.signal?.aborted ? opts.signal.reason : new HttpError(0, 'network error'))
          // An AbortSignal fires once: the listener needs no removing.
          opts.signal?.addEventListener('abort', () => xhr.abort())
          xhr.send(form)
        })
        status = xhr.status
        text = xhr.responseText
      } else {
        progress?.(0, file.size)
        const res = await request(url, { method: 'POST', body: form, signal: opts.signal })
        status = res.status
        text = await res.text()
        progress?.(file.size, file.size)
      }
      const body = answer(status, text)
      const jobId: string = body.job_id
      return { kind, jobId, statusUrl: body.status_url, watch: () => this.watch(kind, jobId) }
    }

    this.#upload = (kind, file, opts) => {
      // With cookie sessions the first upload starts the session: several first uploads at once
      // would start several, and the page would own only the last one's jobs. Until one upload
      // went through, they go one at a time.
      const job = apiKey || sessionStarted ? send(kind, file, opts) : firstUpload.then(async () => await send(kind, file, opts))
      firstUpload = job.then(() => { sessionStarted = true }, () => {})
      return job
    }

    this.#cancel = async (kind, jobId) => {
      const res = await request(route('cancel', kind, jobId), { method: 'POST' })
      answer(res.status, await res.text(), jobId)
    }

    this.#myJobs = (filter) => {
      const f: MyJobs = new MyJobs(filter, async (query) => {
        const res = await request(new URL(`${myJobsPath}?${query}`, baseUrl))
        return answer(res.status, await res.text()).jobs
      }, () => {
        feeds.delete(f)
        if (feeds.size) return
        conn?.remove('')
        settle('')
      })
      feeds.add(f)
      // The first list subscribes the connection to the feed, and is read once that is in effect;
      // the next ones are read at once when it already is.
      if (feeds.size > 1) {
        if (isLive) f._sync()
      } else if (conn) conn.add('', '')
      else if (!retryTimer) connectNow()
      return f
    }

    this.#watch = (kind, jobId) => {
      let watch = watches.get(jobId)
      if (watch) return watch
      watch = new Watch(kind, jobId, () => {
        watches.delete(jobId)
        conn?.remove(jobId)
        settle(jobId)
      }, () => conn?.add(kind, jobId, true))
      watches.set(jobId, watch)
      const ended = (): void => settle(jobId)
      void watch.done.then(ended, ended)
      if (conn) conn.add(kind, jobId)
      else if (!retryTimer) connectNow()
      return watch
    }

    this.#close = () => {
      closed = true
      teardown()
      setState('idle')
    }

    this.#state = () => state
    // The browser knows when the network is gone and back: no point in backing off meanwhile.
    g.addEventListener?.('offline', () => setState('offline'))
    g.addEventListener?.('online', () => { if (!conn) connectNow() })
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

  /**
   * The caller's jobs, newest first, kept current from the feed of their changes and read again
   * after every reconnect, on any transport. Close it when done: while a list is open, the
   * connection stays.
   */
  myJobs (filter: MyJobsFilter = {}): MyJobs {
    return this.#myJobs(filter)
  }

  /** Uploads a file to a kind's upload route; resolves once the job is queued. */
  upload (kind: string, file: Blob, opts: UploadOptions = {}): Promise<UploadedJob> {
    return this.#upload(kind, file, opts)
  }

  /** Cancels a job. Rejects with HttpError 409 when it already ended, NotFoundError when not found. */
  cancel (kind: string, jobId: string): Promise<void> {
    return this.#cancel(kind, jobId)
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
