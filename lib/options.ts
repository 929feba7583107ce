import { type Static, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import type { JobsOptions } from 'bullmq'
import { InvalidOptionError } from './errors'
import type { Storage } from './core/storage'
import type { CreateRouteOptions } from './http/create/enqueue'
import type { QuotaOptions } from './http/create/quotas'
import type { MetricsOptions } from './core/metrics'
import type { RoutePlace } from './http/route-claims'
import { keepWebhookFunctions, type KindWebhookOptions, type ResolvedWebhooks, type WebhooksOptions } from './channels/webhooks/options'

import { KIND_NAME, OptionsSchema } from './options-schema'

type Resolved = Static<typeof OptionsSchema>

/** What a user passes to `register`: everything with a default may be left out. */
export interface KindOptions {
  /** Upload route. @default `<basePath>/upload` */
  uploadPath?: string
  /** Base of `:jobId/status`, `:jobId/result` and `:jobId/cancel`. @default `/<kind>` */
  basePath?: string
  /** BullMQ queue name. @default the kind's name */
  queueName?: string
  /** Accepted MIME types (`text/csv`, `text/*`) or extensions (`.csv`). @default [] (any type) */
  accept?: string[]
  /** Largest accepted file, in bytes. @default `limits.fileSize` */
  maxFileSize?: number
  /** BullMQ options for this kind's jobs, merged over `defaultJobOptions`. */
  jobOptions?: JobsOptions
  /** Webhooks for this kind's jobs (see the README's Webhooks section). @default none */
  webhook?: KindWebhookOptions
  /** Adds `POST <basePath>`, a job from a JSON body `{ data, file? }` (see "Jobs from JSON"). @default undefined (no route) */
  create?: CreateRouteOptions
}

/** Upload lifecycle (`files`). */
export interface FilesOptions {
  /** How long an upload is kept after its job's final state is recorded; 0 removes it at once. @default 0 */
  retentionMs?: number
  /**
   * A `.part` file (an upload cut off by a crash), or a stored file whose job Redis does not know
   * (lost with Redis, or never added), is removed once it is this old. Must exceed the longest
   * upload. @default 3_600_000 (1 hour)
   */
  orphanAgeMs?: number
  /** How often the sweep runs (also once at start): due retentions and orphans. @default 600_000 (10 minutes) */
  sweepIntervalMs?: number
}

export type JobProgressOptions = Partial<Omit<Resolved, 'kinds' | 'limits' | 'session' | 'bridge' | 'uploads' | 'health' | 'webhooks' | 'files' | 'idempotency' | 'quotas' | 'watchTokens' | 'liveLogs' | 'myJobs' | 'inbound' | 'sweepPeriodMs' | 'sweepReadsPerSecond' | 'routePrefix' | 'ssePath' | 'clientRoute' | 'tracing'>> & {
  /**
   * Where the routes outside the kinds' own paths go: liveness and readiness, metrics, the
   * multiplexed SSE stream, my jobs, the client route (`clientRoute: true`) and the dead-letter
   * webhook routes, each at `<routePrefix>/<name>` unless its own option moves it (or turns it
   * off). A prefix no app commonly owns, so registering the plugin takes none of the app's paths;
   * `''` puts them at the root, as in 0.2. The kinds' routes and the sockets stay where they are.
   * @default '/job-progress'
   */
  routePrefix?: string
  /**
   * The multiplexed Server-Sent Events stream (`GET <ssePath>?jobs=<id>,<id>`); `false` leaves it
   * out (each job's own `<basePath>/:jobId/events` stays).
   * @default '<routePrefix>/events'
   */
  ssePath?: string | false
  /**
   * Serves `fastify-job-progress/client` as one ES module, for a page without a bundler: a path,
   * or `true` for `<routePrefix>/client.js`.
   * @default false
   */
  clientRoute?: boolean | string
  /**
   * The safety sweep's coverage period, in ms: every unfinished job watched on an instance is
   * re-read at least once per period, the reads spread evenly over it. A watched job costs
   * 1000 / `sweepPeriodMs` reads per second (0.0017 at the default, within the budget of 0.01
   * Redis commands per second per watched job: keep it at 100 000 or more); 0 turns it off.
   * Faults are detected and repaired without it: it bounds how long a loss nothing revealed lasts.
   * @default 600_000 (10 minutes)
   */
  sweepPeriodMs?: number
  /**
   * @deprecated use `sweepPeriodMs`. Still honoured: 0 turns the sweep off; a positive value caps
   * the sweep's reads per second on an instance, so the period grows past `sweepPeriodMs` once
   * more than cap × period jobs are watched there.
   * @default no cap
   */
  sweepReadsPerSecond?: number
  /**
   * OpenTelemetry traces through the SDK the app registered (see docs/tracing.md): the job's
   * queue adds it with BullMQ's producer span under the active span (the request's, with
   * `@fastify/otel`) and keeps the context in the job (`tm`); each relayed report of a sampled
   * trace gets a delivery span on every instance that writes it to a socket or an SSE stream.
   * Without an SDK it is a no-op: no context is written and nothing is added per message.
   * `false` turns it off even with one.
   * @default true
   */
  tracing?: boolean
  /**
   * Live log lines (`logs` on subscribe, `?logs=1` on SSE). `maxCatchUpLines` (default 1000):
   * most lines one catch-up sends, older ones are named in a `logs_truncated` marker.
   * `maxBacklogBytes` (default 256 KiB, at most half of `maxBufferedBytes`): a watcher with more
   * unread skips lines until it has caught up, then gets a `logs_truncated` marker.
   */
  liveLogs?: { maxCatchUpLines?: number, maxBacklogBytes?: number }
  /**
   * The caller's jobs: `GET <path>` (default `<routePrefix>/jobs`; `false` adds neither route)
   * lists them, `GET <path>/events` and the
   * `jobs` protocol's `subscribe_mine` stream their changes. `maxPerOwner` (default 1000): jobs
   * kept per owner and kind. `ttlSeconds` (default 30 days): an owner's index expires after this
   * long without a new job. `feed` (default true): publish each lifecycle event of a job to its
   * owner's channel (once per cluster; off: the list still works, the feed gets only creations).
   */
  myJobs?: { path?: string | false, maxPerOwner?: number, ttlSeconds?: number, feed?: boolean }
  /**
   * What a socket's own messages may make the server do; past either bound it is closed with
   * `1008` and a reason that names the bound (clients do not reconnect after 1008). Both fit a
   * client that subscribes 100 jobs at once (a dashboard).
   */
  inbound?: {
    /** Actions (subscribe, unsubscribe, the jobs feed) asked for and not yet answered. @default 256 */
    maxInFlight?: number
    /** Messages per second on average, every frame counted (a token bucket's refill). @default 50 */
    messagesPerSecond?: number
    /** Messages at once above the average (the bucket's size). @default 256 */
    burst?: number
  }
  /** How long an `Idempotency-Key` is remembered (per owner and kind), in seconds. @default 86400 */
  idempotency?: { windowSeconds?: number }
  /** Per-owner, per-kind limits on creating jobs, atomic across instances (429 with `Retry-After`). @default no limits */
  quotas?: Partial<QuotaOptions>
  files?: FilesOptions
  kinds: Record<string, KindOptions>
  limits?: Partial<Resolved['limits']>
  /**
   * Time limits of an upload; each ends the upload with a clear status and removes its partial
   * file. `idleTimeoutMs` (default 30 s): no data for that long, 408. `requestTimeoutMs` (default
   * 10 min): still sending after that long, 408. `shutdownGraceMs` (default 10 s): at
   * `app.close()`, uploads still sending after that long are ended with 503 so shutdown does not
   * wait for a slow client. `minBytesPerSecond` (@default 1024) averaged over `minRateWindowMs`
   * (@default 30_000): a slower upload is ended with 408, so a trickle cannot hold a request and a
   * partial file open for the whole `requestTimeoutMs`; 0 turns it off. A refused upload (401,
   * 413, 415, 429 ...) has the rest of its body read and dropped, at most `refusedDrainBytes`
   * (@default 16 MiB) for at most `refusedDrainMs` (@default 5_000), before it is answered and its
   * connection closed: a client still sending then reads the answer instead of a reset.
   */
  uploads?: Partial<Resolved['uploads']>
  /**
   * Liveness (`livePath`, default `<routePrefix>/health`: 200 while the process serves) and
   * readiness (`readyPath`, default `<routePrefix>/ready`: 200 when Redis is reachable and the
   * bridge runs, else 503) routes; `false` adds neither (an app with its own).
   */
  health?: false | { livePath?: string, readyPath?: string }
  /**
   * The app's public base URL (`https://api.example.com`, optionally with a path prefix): the
   * upload answer's `ws_url` is built from it (`http` becomes `ws`, `https` becomes `wss`). Without
   * it `ws_url` is a path (`/ws/<kind>/<id>`) that the client resolves against the URL it called.
   * Never taken from request headers (`Host`, `X-Forwarded-*`), which a client controls.
   * @default undefined
   */
  publicUrl?: string
  session?: Partial<Resolved['session']>
  /**
   * Signed, expiring tokens that let a page on another origin (or another app) watch one job
   * without the owner's session: the upload's 202 carries `watch_token`, and
   * `POST <basePath>/:jobId/watch-token` mints a fresh one. `secret` (a string of 16+ characters,
   * or an array, newest first: the first signs, all verify) defaults to `session.secret`; with
   * neither, no tokens are issued. `ttlSeconds`: how long a token is valid. @default { ttlSeconds: 3600 }
   */
  watchTokens?: Partial<Resolved['watchTokens']>
  bridge?: Partial<Resolved['bridge']>
  webhooks?: WebhooksOptions
}

/** A kind as every part reads it: its queue and paths resolved once, in {@link resolveOptions}. */
export type ResolvedKind = Omit<Resolved['kinds'][string], 'queueName' | 'basePath' | 'uploadPath'> & {
  /** The kind's BullMQ queue: `queueName`, else the kind's name. */
  queueName: string
  /** `basePath`, else `/<kind>`. */
  basePath: string
  /** `uploadPath`, else `<basePath>/upload`. */
  uploadPath: string
}

export type ResolvedOptions = Omit<Resolved, 'webhooks' | 'kinds' | 'health' | 'ssePath' | 'myJobs' | 'clientRoute'> & {
  webhooks: ResolvedWebhooks
  kinds: Record<string, ResolvedKind>
  /** Every route path resolved against `routePrefix`, in {@link resolveOptions}. */
  health: false | { livePath: string, readyPath: string }
  ssePath: string | false
  myJobs: Omit<Resolved['myJobs'], 'path'> & { path: string | false }
  clientRoute: string | false
}

/** The plugin's routes outside the kinds' paths: each one's name under `routePrefix`, spelled once. */
const ROUTE_NAMES = { live: 'health', ready: 'ready', metrics: 'metrics', sse: 'events', myJobs: 'jobs', client: 'client.js', webhooks: 'webhooks' } as const

const FUNCTION_OPTIONS = ['getOwner', 'canAccess'] as const
const KEPT = ['connection', 'storage', 'protocols', 'apiKeys', 'metrics', 'telemetry', ...FUNCTION_OPTIONS] as const

function placeholder (key: string, value: unknown): unknown {
  if (key === 'connection') return typeof value === 'string' ? value : (value !== null && typeof value === 'object' ? {} : value)
  if (key === 'protocols') return Array.isArray(value) ? value.map(() => ({})) : value
  if (key === 'storage') return value !== null && typeof value === 'object' ? {} : value
  return undefined
}

/** Applies defaults and checks the options, throwing one clear error naming every bad option. */
export function resolveOptions (input: unknown): ResolvedOptions {
  if (input === null || typeof input !== 'object') {
    throw new InvalidOptionError('options must be an object with at least `kinds`')
  }
  // Class instances (an ioredis client, a storage, protocols, functions) are checked by shape
  // here and kept as they are: cloning them for TypeBox would copy sockets and cycles.
  const raw: Record<string, unknown> = { ...(input as Record<string, unknown>) }
  const kept: Record<string, unknown> = {}
  for (const key of KEPT) {
    if (raw[key] !== undefined) {
      kept[key] = raw[key]
      raw[key] = placeholder(key, raw[key])
    }
  }
  const webhookProblems: string[] = []
  // The dead-letter routes' prefix is the one path default that depends on another option.
  const routePrefix = typeof raw.routePrefix === 'string' ? raw.routePrefix : '/job-progress'
  if (raw.webhooks !== null && typeof raw.webhooks === 'object' && (raw.webhooks as { routePrefix?: unknown }).routePrefix === undefined) {
    raw.webhooks = { ...raw.webhooks, routePrefix: `${routePrefix}/${ROUTE_NAMES.webhooks}` }
  }
  const restoreWebhooks = keepWebhookFunctions(raw, webhookProblems)
  const restoreCreate = keepCreateOptions(raw, webhookProblems)
  const opts = Value.Default(OptionsSchema, Value.Clone(raw)) as Record<string, unknown>
  const problems = [...Value.Errors(OptionsSchema, opts)].map(e => {
    // A bad kind name only shows as an "unexpected property": say what a name may be.
    const name = /^\/kinds\/([^/]+)$/.exec(e.path)?.[1].replace(/~1/g, '/').replace(/~0/g, '~')
    if (name !== undefined && !new RegExp(KIND_NAME).test(name)) {
      return `kind name "${name}" is invalid: use letters, digits, "_", "." or "-", starting with a letter or digit`
    }
    if (e.path.startsWith('/webhooks/secret')) return '`webhooks.secret` must be a `whsec_` secret or an array of them (newest first)'
    if (e.path.startsWith('/watchTokens/secret')) return '`watchTokens.secret` must be a string of at least 16 characters, or an array of such strings (newest first)'
    if (e.path.startsWith('/session/secret')) return '`session.secret` must be a string of at least 16 characters, or an array of such strings (newest first)'
    return `${e.path === '' ? 'options' : '`' + e.path.slice(1).replace(/\//g, '.') + '`'} ${e.message.toLowerCase()}`
  })
  problems.push(...webhookProblems)
  problems.splice(0, problems.length, ...new Set(problems))
  // Checked here, before any connection is opened: a refusal later would leave clients behind.
  const kindOfQueue = new Map<string, string>()
  for (const [kind, k] of Object.entries((opts.kinds ?? {}) as Record<string, { queueName?: unknown }>)) {
    const queue = typeof k?.queueName === 'string' ? k.queueName : kind
    const other = kindOfQueue.get(queue)
    if (other !== undefined) problems.push(`kinds "${other}" and "${kind}" use the same queue "${queue}"`)
    else kindOfQueue.set(queue, kind)
  }
  for (const key of FUNCTION_OPTIONS) {
    if (kept[key] !== undefined && typeof kept[key] !== 'function') problems.push(`\`${key}\` must be a function`)
  }
  const storage = kept.storage as Partial<Storage> | undefined
  if (storage !== undefined && (typeof storage.write !== 'function' || typeof storage.open !== 'function' || typeof storage.remove !== 'function')) {
    problems.push('`storage` must implement write(), open() and remove()')
  }
  const protocols = kept.protocols
  if (protocols !== undefined && (!Array.isArray(protocols) || protocols.some(p => p === null || typeof p !== 'object' || typeof p.path !== 'string' || typeof p.render !== 'function'))) {
    problems.push('`protocols` must be an array of protocol definitions, each with a `path` and a `render` function')
  }
  const keys = kept.apiKeys
  if (keys !== undefined && typeof keys !== 'function' && (keys === null || typeof keys !== 'object' || Object.values(keys).some(v => typeof v !== 'string' || v === ''))) {
    problems.push('`apiKeys` must be a function or an object mapping each key to its owner (a non-empty string)')
  }
  if (problems.length > 0) throw new InvalidOptionError(problems.join('; '))
  Object.assign(opts, kept)
  restoreWebhooks(opts)
  restoreCreate(opts)
  for (const [kind, k] of Object.entries(opts.kinds as Record<string, Partial<ResolvedKind>>)) {
    k.queueName ??= kind
    k.basePath ??= `/${kind}`
    k.uploadPath ??= `${k.basePath}/upload`
  }
  resolveRoutes(opts)
  return opts as unknown as ResolvedOptions
}

export type { TSchema }

/**
 * A kind's `create` holds a schema (TypeBox's carry symbols) and a function: kept aside from the
 * clone and checked by shape.
 */
function keepCreateOptions (raw: Record<string, unknown>, problems: string[]): (opts: Record<string, unknown>) => void {
  if (raw.kinds === null || typeof raw.kinds !== 'object') return () => {}
  const kinds: Record<string, unknown> = { ...(raw.kinds as Record<string, unknown>) }
  const kept = new Map<string, unknown>()
  for (const [kind, k] of Object.entries(kinds)) {
    const create = (k as { create?: unknown } | null)?.create
    if (create === undefined) continue
    const c = create as { schema?: unknown, resolveFile?: unknown } | null
    if (c === null || typeof c !== 'object' || (c.schema !== undefined && (c.schema === null || typeof c.schema !== 'object')) ||
      (c.resolveFile !== undefined && typeof c.resolveFile !== 'function')) {
      problems.push(`\`kinds.${kind}.create\` must be an object with an optional \`schema\` (a JSON schema) and an optional \`resolveFile\` function`)
    }
    kept.set(kind, create)
    kinds[kind] = { ...(k as object), create: {} }
  }
  raw.kinds = kinds
  return (opts) => {
    for (const [kind, create] of kept) (opts.kinds as Record<string, Record<string, unknown>>)[kind].create = create
  }
}

/** Each route option left out gets its default under `routePrefix` (absolute paths stay as given). */
function resolveRoutes (opts: Record<string, unknown>): void {
  const under = (name: string): string => `${opts.routePrefix as string}/${name}`
  const health = opts.health as false | { livePath?: string, readyPath?: string }
  if (health !== false) {
    health.livePath ??= under(ROUTE_NAMES.live)
    health.readyPath ??= under(ROUTE_NAMES.ready)
  }
  opts.ssePath ??= under(ROUTE_NAMES.sse)
  const myJobs = opts.myJobs as { path?: string | false }
  myJobs.path ??= under(ROUTE_NAMES.myJobs)
  if (opts.clientRoute === true) opts.clientRoute = under(ROUTE_NAMES.client)
  const metrics = opts.metrics
  if (metrics === true) opts.metrics = { path: under(ROUTE_NAMES.metrics) }
  else if (metrics !== null && typeof metrics === 'object' && (metrics as MetricsOptions).path === undefined) {
    opts.metrics = { ...(metrics as MetricsOptions), path: under(ROUTE_NAMES.metrics) }
  }
}

/**
 * The routes the plugin adds, each with the option that places it: checked against the app's
 * before anything is opened, and named when Fastify refuses one.
 */
export function routePlaces (opts: ResolvedOptions): RoutePlace[] {
  const places: RoutePlace[] = []
  const add = (method: RoutePlace['method'], path: string, advice: string): void => { places.push({ method, path, advice }) }
  if (opts.health !== false) {
    add('GET', opts.health.livePath, 'set `health.livePath` to another path (or `health: false` to add neither health route)')
    add('GET', opts.health.readyPath, 'set `health.readyPath` to another path (or `health: false` to add neither health route)')
  }
  const metrics = opts.metrics as MetricsOptions | boolean | undefined
  if (metrics !== undefined && metrics !== false && metrics !== true && typeof metrics.path === 'string') {
    add('GET', metrics.path, 'set `metrics.path` to another path (or `false` to serve no route)')
  }
  if (opts.ssePath !== false) add('GET', opts.ssePath, 'set `ssePath` to another path (or `false` to leave the multiplexed stream out)')
  if (opts.myJobs.path !== false) {
    add('GET', opts.myJobs.path, 'set `myJobs.path` to another path (or `false` to leave the my-jobs routes out)')
    add('GET', `${opts.myJobs.path}/events`, 'set `myJobs.path` to another path (or `false` to leave the my-jobs routes out)')
  }
  if (opts.clientRoute !== false) add('GET', opts.clientRoute, 'set `clientRoute` to another path (or `false`)')
  if (opts.webhooks.authorize !== undefined) add('GET', `${opts.webhooks.routePrefix}/dead`, 'set `webhooks.routePrefix` to another path')
  for (const [kind, k] of Object.entries(opts.kinds)) {
    add('POST', k.uploadPath, `set \`kinds.${kind}.uploadPath\` to another path`)
    if (k.create !== undefined) add('POST', k.basePath, `set \`kinds.${kind}.basePath\` to another path`)
    places.push({ method: 'GET', path: k.basePath, advice: `set \`kinds.${kind}.basePath\` to another path`, ahead: false })
    places.push({ method: 'GET', path: `${opts.wsPrefix}/${kind}`, advice: 'set `wsPrefix` to another path', ahead: false })
  }
  for (const [i, protocol] of opts.protocols.entries()) {
    places.push({ method: 'GET', path: protocol.path, advice: `give \`protocols[${i}]\` (${protocol.name}) another path`, ahead: protocol.perJob !== true })
  }
  return places
}
