/**
 * fastify-job-progress/client: watch jobs from a browser or Node ≥ 20. One connection per client
 * whatever the number of watched jobs; WebSocket, else Server-Sent Events, else polling, and back
 * up when the better transport works again; full-jitter backoff; every watched job resubscribed
 * after a reconnect, so no final state is lost; typed errors instead of retry loops.
 */
import { AuthError, type ConnectionError } from './errors'
import { MyJobs, type MyJobsFilter } from './my-jobs'
import { closeError, type Conn, type Env } from './link'
import type { ClientOptions, ConnectionEvent, Transport, UploadOptions } from './types'
import { Watch, type UploadedJob } from './watch'
import { websocket } from './websocket'

export * from './errors'
export type * from './types'
export { Watch }
export type { UploadedJob } from './watch'
export { MyJobs }
export type { MyJob, MyJobsFilter } from './my-jobs'
export { CloseCodes, shouldRetry, CLOSE_ADVICE } from '../lib/wire/close-codes'

type Listener<T> = (value: T) => void
type Timer = ReturnType<typeof setTimeout> | undefined

/**
 * The client. Create one per page (or process) and share it.
 *
 * Its state lives in the constructor's closure, where names minify, and so do its methods.
 */
export class JobProgressClient {
  /** The connection's state now. */
  declare readonly state: ConnectionEvent
  /** Calls `fn` on every connection state change; returns the unsubscribe. */
  declare readonly onState: (fn: Listener<ConnectionEvent>) => () => void
  /** Watches a job; watching the same job twice returns the same Watch. */
  declare readonly watch: (kind: string, jobId: string) => Watch
  /**
   * The caller's jobs, newest first, kept current by the feed of their changes and read again
   * after every reconnect, on any transport. Close it when done: while a list is open, the
   * connection stays.
   */
  declare readonly myJobs: (filter?: MyJobsFilter) => MyJobs
  /** Uploads a file to a kind's upload route; resolves once the job is queued. */
  declare readonly upload: (kind: string, file: Blob, opts?: UploadOptions) => Promise<UploadedJob>
  /** Cancels a job. Rejects with HttpError 409 when it already ended, NotFoundError when not found. */
  declare readonly cancel: (kind: string, jobId: string) => Promise<void>
  /** Closes the connection and stops every timer; watches stay as they are. */
  declare readonly close: () => void
  /** Connections opened so far (for tests and diagnostics). */
  connections = 0

  constructor (options: ClientOptions = {}) {
    const g = globalThis as unknown as { location?: { origin: string }, WebSocket?: typeof WebSocket, addEventListener?: (n: string, f: () => void) => void, fetch: typeof fetch }
    const {
      baseUrl = g.location?.origin,
      apiKey,
      apiKeyVia = 'subprotocol',
      credentials = 'same-origin',
      transports: wanted = ['websocket', 'sse', 'polling'],
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
    const self = this as { -readonly [K in keyof JobProgressClient]: JobProgressClient[K] }
    const route = (name: 'status' | 'result' | 'cancel', kind: string, id: string): URL => new URL(paths[name]?.(kind, id) ?? `/${kind}/${id}/${name}`, baseUrl)
    const headers: Record<string, string> = apiKey ? { authorization: `Bearer ${apiKey}` } : {}
    const order = wanted.filter(t => t !== 'websocket' || Ws)
    const watches = new Map<string, Watch>()
    /** The open lists of the caller's jobs: while there is one, the connection follows the feed. */
    const feeds = new Set<MyJobs>()
    const listeners = new Set<Listener<ConnectionEvent>>()
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
    let closed = false
    let sessionStarted = false
    let firstUpload: Promise<unknown> = Promise.resolve()

    const active = (): Watch[] => [...watches.values()].filter(w => !w.ended)
    /** What a connection carries: each active watch's job and kind, and the feed (`''`) while a list follows it. */
    const want = (): Array<[string, string]> => active().map((w): [string, string] => [w.jobId, w.kind]).concat(feeds.size ? [['', '']] : [])

    const setState = (name: ConnectionEvent['state'], transport: Transport | null = null, extra?: { retryInMs?: number, error?: Error }): void => {
      const state = self.state
      // Each wait before a reconnect is reported, even when the state stays `reconnecting`.
      if (name === state?.state && transport === state.transport && !extra) return
      self.state = { state: name, transport, ...extra }
      for (const fn of listeners) fn(self.state)
    }
    setState('idle')

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
      conn?.shut_()
      probe?.shut_()
      dropConn()
      probe = null
    }

    /** A job ended or was dropped (`''`: the last list closed): with nothing left to watch, no connection is held. */
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

    /** A request with the client's credentials. */
    const request = async (url: URL, init?: RequestInit): Promise<Response> => await fetchFn(url, { headers, credentials, ...init })

    const env: Env = {
      base_: baseUrl,
      key_: apiKey,
      via_: apiKeyVia,
      Ws_: Ws,
      wsPath_: wsPath,
      ssePath_: ssePath,
      mine_: myJobsPath,
      headers_: headers,
      pollMs_: pollIntervalMs,
      request_: request,
      route_: route,
      watches_: watches,
      feeds_: feeds,
      active_: active,
      update_: (m) => {
        const watch = watches.get(m.job_id)
        if (!watch) return
        // The message's fields under the client's names; any field a newer server adds passes through.
        const { type, ts, job_id: jobId, eta_seconds: etaSeconds, ...fields } = m
        // The last event id moves with the state held, never to one refused as older.
        if (watch._update({ kind: watch.kind, jobId, ...fields, result: fields.result ?? null, error: fields.error ?? null, etaSeconds }) && m.version) env.last_ = `${m.job_id}@${m.version}`
      }
    }

    /**
     * Opens `transport` (client/websocket.ts, sse.ts, polling.ts) for every active watch and the feed; as a probe
     * (trying the best transport while on a fallback) it takes over only once it is live. The
     * transports share the watched jobs, the end of a connection and the reading of a message;
     * each adds only how it carries them.
     */
    const connect = (transport: Transport, probing: boolean): void => {
      const watched = new Map(want())
      const c: Conn = {
        w_: watched,
        ended_: false,
        up_: false,
        put_ (kind, jobId, again) {
          if (again || !watched.has(jobId)) { watched.set(jobId, kind); c.add_(jobId) }
        },
        drop_ (jobId) {
          if (watched.delete(jobId)) c.rm_(jobId)
        },
        shut_ () {
          c.ended_ = true
          c.stop_()
        },
        add_: () => {},
        rm_: () => {},
        stop_: () => {},
        touch_: () => { lastSeen = Date.now() },
        live_: () => {
          if (c.up_) return
          c.up_ = true
          if (probing) {
            // The better transport works: it takes over, and the fallback goes.
            probing = false
            probe = null
            conn?.shut_()
            clearTimeout(retryTimer)
            retryTimer = undefined
            conn = c
            level = 0
            // Jobs watched since the probe opened were given to the old connection only.
            for (const [jobId, kind] of want()) {
              if (!watched.has(jobId)) {
                watched.set(jobId, kind)
                // The WebSocket subscribes every watched job once live; SSE needs a new request.
                if (transport !== 'websocket') c.add_(jobId)
              }
            }
          }
          isLive = true
          failures = attempt = 0
          c.touch_()
          setState(transport === 'websocket' ? 'live' : 'fallback', transport)
          startWatchdog()
          if (level) scheduleUpgrade()
        },
        end_: (error) => {
          if (c.ended_) return
          c.shut_()
          if (probing) {
            probe = null
            return scheduleUpgrade()
          }
          dropConn()
          if (error) return fail(error, watched.keys())
          if (!want().length) return
          if (!c.up_ && ++failures >= fallbackAfter && level < order.length - 1) {
            level++
            failures = 0
            // A new transport is tried at once: the old one's failure says nothing about it.
            return connectNow()
          }
          retryLater()
        },
        msg_: (type, m) => {
          if (!m) return
          if (type === 'job_update') env.update_(m)
          else if (type === 'close') c.end_(closeError(m.code, m.reason))
          // An error naming a job, its log lines and its stream chunks: its watch reads them; the
          // feed's changes, resyncs and subscription: the lists of the caller's jobs.
          else {
            watches.get(m.job_id)?._msg(type, m)
            for (const f of feeds) f._msg(type, m)
          }
        }
      }
      this.connections++
      if (probing) probe = c
      else conn = c
      if (transport === 'websocket') return websocket(c, env)
      // The fallbacks are loaded when first needed (a bundler makes each a chunk of its own).
      ;(transport === 'sse' ? import('./sse').then(m => m.sse) : import('./polling').then(m => m.polling)).then(open => {
        if (!c.ended_) open(c, env)
      }, () => c.end_(null))
    }

    const connectNow = (): void => {
      const transport = order[level]
      const state = self.state
      if (closed || !want().length || !transport) return
      // One connection at a time: a pending retry or a live one (the browser said it is back online) gives way.
      clearTimeout(retryTimer)
      retryTimer = undefined
      const wait = pausedUntil - Date.now()
      if (wait > 0) return retryLater(wait)
      conn?.shut_()
      setState(state.state === 'idle' || state.error ? 'connecting' : state.state, transport)
      connect(transport, false)
    }

    const startWatchdog = (): void => {
      clearInterval(watchdog)
      watchdog = setInterval(() => {
        // Silent for too long: the connection is dead without having said so.
        if (Date.now() - lastSeen <= heartbeatTimeoutMs || !conn) return
        conn.shut_()
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

    // An expired session: the next uploads start a new one, one at a time again.
    const unauthorized = (): void => { sessionStarted = false }
    const read = async (url: URL, init?: RequestInit, jobId?: string): Promise<any> => {
      const res = await request(url, init)
      return (await import('./upload')).check([res.status, await res.text()], unauthorized, jobId)
    }

    const send = async (kind: string, file: Blob, opts: UploadOptions): Promise<UploadedJob> => {
      const { post, check } = await import('./upload')
      const body = check(await post(new URL(paths.upload?.(kind) ?? `/${kind}/upload`, baseUrl), file, opts, headers, credentials, request), unauthorized)
      const jobId: string = body.job_id
      return { kind, jobId, statusUrl: body.status_url, watch: () => this.watch(kind, jobId) }
    }

    self.upload = (kind, file, opts = {}) => {
      // With cookie sessions the first upload starts the session: several first uploads at once
      // would start several, and the page would own only the last one's jobs. Until one upload
      // went through, they go one at a time.
      const job = apiKey || sessionStarted ? send(kind, file, opts) : firstUpload.then(async () => await send(kind, file, opts))
      firstUpload = job.then(() => { sessionStarted = true }, () => {})
      return job
    }

    self.cancel = async (kind, jobId) => {
      await read(route('cancel', kind, jobId), { method: 'POST' }, jobId)
    }

    self.myJobs = (filter = {}) => {
      const f: MyJobs = new MyJobs(filter, async (query) => (await read(new URL(`${myJobsPath}?${query}`, baseUrl))).jobs, () => {
        feeds.delete(f)
        if (feeds.size) return
        conn?.drop_('')
        settle('')
      })
      feeds.add(f)
      // The first list subscribes the connection to the feed, and is read once that is in effect;
      // the next ones are read at once when it already is.
      if (feeds.size > 1) {
        if (isLive) f._sync()
      } else if (conn) conn.put_('', '')
      else if (!retryTimer) connectNow()
      return f
    }

    self.watch = (kind, jobId) => {
      let watch = watches.get(jobId)
      if (watch) return watch
      watch = new Watch(kind, jobId, () => {
        watches.delete(jobId)
        conn?.drop_(jobId)
        settle(jobId)
      }, () => conn?.put_(kind, jobId, true))
      watches.set(jobId, watch)
      const ended = (): void => settle(jobId)
      void watch.done.then(ended, ended)
      if (conn) conn.put_(kind, jobId)
      else if (!retryTimer) connectNow()
      return watch
    }

    self.close = () => {
      closed = true
      teardown()
      setState('idle')
    }

    self.onState = (fn) => {
      listeners.add(fn)
      return () => listeners.delete(fn)
    }
    // The browser knows when the network is gone and back: no point in backing off meanwhile.
    g.addEventListener?.('offline', () => setState('offline'))
    g.addEventListener?.('online', () => { if (!conn) connectNow() })
  }
}

/** Creates a client (same as `new JobProgressClient(options)`). */
export function createClient (options?: ClientOptions): JobProgressClient {
  return new JobProgressClient(options)
}
