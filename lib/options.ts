import { Type, type Static, type TSchema } from '@sinclair/typebox'
import { Value } from '@sinclair/typebox/value'
import type { FastifyRequest } from 'fastify'
import type { JobsOptions } from 'bullmq'
import type { Cluster, Redis, RedisOptions } from 'ioredis'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { InvalidOptionError } from './errors'
import type { Storage } from './core/storage'
import type { CanAccess } from './core/access'
import type { CreateRouteOptions } from './http/create/enqueue'
import type { QuotaOptions } from './http/create/quotas'
import type { ProtocolDefinition } from './protocols/types'
import type { MetricsOptions } from './core/metrics'
import type { RoutePlace } from './http/route-claims'
import type { Telemetry } from './core/telemetry'
import { INBOUND_DEFAULTS } from './session/inbound'
import { keepWebhookFunctions, KindWebhookSchema, WebhooksSchema, type KindWebhookOptions, type ResolvedWebhooks, type WebhooksOptions } from './channels/webhooks/options'

/** A function-valued option: TypeBox checks it is a function, TypeScript gives its signature. */
function Fn<T> (description: string) {
  return Type.Unsafe<T>(Type.Any({ description, [Symbol.for('jp.fn')]: true }))
}

/** A kind's name becomes part of its routes and queue, so it is kept to URL- and key-safe characters. */
const KIND_NAME = '^[A-Za-z0-9][A-Za-z0-9_.-]*$'

const KindSchema = Type.Object({
  uploadPath: Type.Optional(Type.String({ pattern: '^/', description: 'upload route; default `<basePath>/upload`' })),
  basePath: Type.Optional(Type.String({ pattern: '^/', description: 'base of the status, result and cancel routes; default `/<kind>`' })),
  queueName: Type.Optional(Type.String({ minLength: 1, description: 'BullMQ queue name; default the kind' })),
  accept: Type.Optional(Type.Array(Type.String({ minLength: 1 }), { description: 'accepted MIME types (`text/csv`, `text/*`) or extensions (`.csv`); empty or absent accepts any' })),
  maxFileSize: Type.Optional(Type.Integer({ minimum: 1, description: 'bytes; default `limits.fileSize`' })),
  jobOptions: Type.Optional(Type.Unsafe<JobsOptions>(Type.Object({}, { additionalProperties: true }))),
  webhook: Type.Optional(KindWebhookSchema),
  create: Type.Optional(Type.Unsafe<CreateRouteOptions>(Type.Object({}, { additionalProperties: true, description: 'adds `POST <basePath>`: a job from JSON' })))
}, { additionalProperties: false })

export const OptionsSchema = Type.Object({
  connection: Type.Unsafe<Redis | Cluster | RedisOptions | string>(Type.Union([Type.String(), Type.Object({}, { additionalProperties: true })], { default: 'redis://127.0.0.1:6379' })),
  prefix: Type.String({ minLength: 1, default: 'bull' }),
  channelPrefix: Type.String({ minLength: 1, default: 'jp' }),
  // additionalProperties: without it a name that misses the pattern is not checked at all.
  kinds: Type.Record(Type.String({ pattern: KIND_NAME }), KindSchema, { minProperties: 1, additionalProperties: false }),
  wsPrefix: Type.String({ pattern: '^/', default: '/ws' }),
  progressVersion: Type.Boolean({ default: false }),
  progressDetails: Type.Boolean({ default: false, description: 'adds the worker\'s stage, message and data to the per-job socket and status messages (seed 000 format); off: exactly the seed\'s fields' }),
  routePrefix: Type.String({ pattern: '^(/[^?#]*[^/?#])?$', default: '/job-progress', description: 'where the routes outside the kinds\' own paths go (health, readiness, metrics, SSE, my jobs, the client, dead webhooks); "" puts them at the root' }),
  ssePath: Type.Optional(Type.Union([Type.Literal(false), Type.String({ pattern: '^/' })], { description: 'the multiplexed SSE stream; default `<routePrefix>/events`; false leaves it out' })),
  sseRetryMs: Type.Integer({ minimum: 0, default: 2_000 }),
  clientRoute: Type.Union([Type.Boolean(), Type.String({ pattern: '^/' })], { default: false, description: 'serves the client as one ES module: a path, or true for `<routePrefix>/client.js`' }),
  storage: Type.Optional(Type.Unsafe<Storage>(Type.Object({}, { additionalProperties: true }))),
  uploadDir: Type.String({ minLength: 1, default: join(tmpdir(), 'fastify-job-progress') }),
  limits: Type.Object({
    fileSize: Type.Integer({ minimum: 1, default: 100 * 1024 * 1024 }),
    fields: Type.Integer({ minimum: 0, default: 20 }),
    fieldSize: Type.Integer({ minimum: 1, default: 64 * 1024 }),
    parts: Type.Integer({ minimum: 1, default: 30 })
  }, { default: {}, additionalProperties: false }),
  uploads: Type.Object({
    idleTimeoutMs: Type.Integer({ minimum: 100, default: 30_000, description: 'an upload that sends no data for this long is ended with 408' }),
    requestTimeoutMs: Type.Integer({ minimum: 100, default: 10 * 60_000, description: 'an upload still sending after this long is ended with 408' }),
    shutdownGraceMs: Type.Integer({ minimum: 0, default: 10_000, description: 'at close, uploads still sending after this long are ended with 503' }),
    minBytesPerSecond: Type.Integer({ minimum: 0, default: 1024, description: 'an upload that sends less than this per second, averaged over minRateWindowMs, is ended with 408; 0 turns the check off' }),
    minRateWindowMs: Type.Integer({ minimum: 100, default: 30_000, description: 'the window over which minBytesPerSecond is averaged' }),
    refusedDrainBytes: Type.Integer({ minimum: 0, default: 16 * 1024 * 1024, description: 'of a refused upload, at most this much of the rest of the body is read (and dropped) before the answer, so the client can read it' }),
    refusedDrainMs: Type.Integer({ minimum: 0, default: 5_000, description: 'and for at most this long; then the answer is sent and the connection closed' })
  }, { default: {}, additionalProperties: false }),
  health: Type.Union([Type.Literal(false), Type.Object({
    livePath: Type.Optional(Type.String({ pattern: '^/', description: 'default `<routePrefix>/health`' })),
    readyPath: Type.Optional(Type.String({ pattern: '^/', description: 'default `<routePrefix>/ready`' }))
  }, { additionalProperties: false })], { default: {} }),
  publicUrl: Type.Optional(Type.String({ pattern: '^(https?|wss?)://[^/?#]+(/[^?#]*)?$', description: 'public base URL of the app, used for `ws_url`; without it `ws_url` is a path' })),
  session: Type.Object({
    secret: Type.Optional(Type.Union([Type.String({ minLength: 16 }), Type.Array(Type.String({ minLength: 16 }), { minItems: 1 })])),
    cookieName: Type.String({ minLength: 1, default: 'jp_session' }),
    secure: Type.Union([Type.Boolean(), Type.Literal('auto')], { default: 'auto' }),
    maxAgeSeconds: Type.Integer({ minimum: 1, default: 7 * 24 * 3600 })
  }, { default: {}, additionalProperties: false }),
  watchTokens: Type.Object({
    secret: Type.Optional(Type.Union([Type.String({ minLength: 16 }), Type.Array(Type.String({ minLength: 16 }), { minItems: 1 })])),
    ttlSeconds: Type.Integer({ minimum: 1, default: 3600 })
  }, { default: {}, additionalProperties: false }),
  getOwner: Type.Optional(Fn<(request: FastifyRequest) => string | null | undefined | Promise<string | null | undefined>>('resolves the owner of a request')),
  apiKeys: Type.Optional(Type.Unsafe<Record<string, string> | ((key: string) => string | null | undefined | Promise<string | null | undefined>)>(Type.Any())),
  allowedOrigins: Type.Optional(Type.Array(Type.String({ minLength: 1 }))),
  throttleMs: Type.Integer({ minimum: 0, default: 100 }),
  maxPayload: Type.Integer({ minimum: 16, default: 4096 }),
  maxBufferedBytes: Type.Integer({ minimum: 1024, default: 4 * 1024 * 1024 }),
  pingIntervalMs: Type.Integer({ minimum: 100, default: 30_000 }),
  heartbeatIntervalMs: Type.Integer({ minimum: 100, default: 30_000 }),
  sendTimeoutMs: Type.Integer({ minimum: 100, default: 5_000 }),
  reconcileIntervalMs: Type.Integer({ minimum: 100, default: 5_000, description: 'deprecated, ignored: convergence is paid per event and per fault' }),
  sweepPeriodMs: Type.Integer({ minimum: 0, default: 600_000, description: 'safety sweep: every unfinished watched job re-read at least once per period, spread evenly; 0 turns it off' }),
  sweepReadsPerSecond: Type.Optional(Type.Number({ minimum: 0, description: 'deprecated, use sweepPeriodMs: 0 turns the sweep off, a positive value caps its reads per second per instance' })),
  maxSubscriptionsPerConnection: Type.Integer({ minimum: 1, default: 100 }),
  inbound: Type.Object({
    maxInFlight: Type.Integer({ minimum: 1, default: INBOUND_DEFAULTS.maxInFlight, description: 'actions (subscribe, unsubscribe) a socket may have asked for and not yet had answered; one more closes it with 1008' }),
    messagesPerSecond: Type.Number({ exclusiveMinimum: 0, default: INBOUND_DEFAULTS.messagesPerSecond, description: 'messages per second a socket may send on average; faster, once its burst is spent, closes it with 1008' }),
    burst: Type.Integer({ minimum: 1, default: INBOUND_DEFAULTS.burst, description: 'messages a socket may send at once above the average' })
  }, { default: {}, additionalProperties: false }),
  maxConnectionsPerOwner: Type.Integer({ minimum: 1, default: 50 }),
  instanceHeartbeatMs: Type.Integer({ minimum: 100, default: 5_000, description: 'how often an instance tells the others it is alive (the connection limit across instances); a killed instance\'s connections stop counting after 3 of these' }),
  firstMessageTimeoutMs: Type.Integer({ minimum: 100, default: 5_000 }),
  cancelTtlSeconds: Type.Integer({ minimum: 1, default: 7 * 24 * 3600 }),
  bridge: Type.Object({
    enabled: Type.Boolean({ default: true }),
    group: Type.String({ minLength: 1, default: 'jp-bridge' }),
    blockMs: Type.Integer({ minimum: 10, default: 2_000 }),
    claimIdleMs: Type.Integer({ minimum: 100, default: 10_000 }),
    claimIntervalMs: Type.Integer({ minimum: 100, default: 5_000 }),
    consumerIdleMs: Type.Integer({ minimum: 100, default: 10 * 60_000 }),
    ordered: Type.Boolean({ default: true, description: 'read the event stream and publish in one script on Redis, so every job\'s messages leave Redis in stream order whatever the number of instances (one Redis with classic pub/sub; a cluster relays from Node)' })
  }, { default: {}, additionalProperties: false }),
  defaultJobOptions: Type.Unsafe<JobsOptions>(Type.Object({}, {
    additionalProperties: true,
    default: { removeOnComplete: { age: 24 * 3600 }, removeOnFail: { age: 7 * 24 * 3600 } }
  })),
  // Uploads: kept until their job's final state is in Redis, then for `retentionMs`; a sweep at
  // start and every `sweepIntervalMs` removes `.part` files and files of unknown jobs older than `orphanAgeMs`.
  files: Type.Object({
    retentionMs: Type.Integer({ minimum: 0, default: 0 }),
    orphanAgeMs: Type.Integer({ minimum: 1_000, default: 3_600_000 }),
    sweepIntervalMs: Type.Integer({ minimum: 100, default: 600_000 })
  }, { default: {}, additionalProperties: false }),
  protocols: Type.Array(Type.Unsafe<ProtocolDefinition>(Type.Object({}, { additionalProperties: true })), { default: [] }),
  instanceId: Type.Optional(Type.String({ minLength: 1 })),
  pubsub: Type.Optional(Type.Union([Type.Literal('classic'), Type.Literal('sharded')], { description: 'pub/sub style; default sharded on a Cluster connection, classic otherwise' })),
  metrics: Type.Optional(Type.Unsafe<boolean | MetricsOptions>(Type.Any({ description: 'serve Prometheus metrics: true, or { path, registry, prefix }' }))),
  telemetry: Type.Optional(Type.Unsafe<Telemetry>(Type.Any({ description: 'a telemetry backend of your own' }))),
  tracing: Type.Boolean({ default: true, description: 'OpenTelemetry traces from the upload to the socket write, through the app\'s registered SDK (a no-op without one)' }),
  webhooks: WebhooksSchema,
  liveLogs: Type.Object({
    maxCatchUpLines: Type.Integer({ minimum: 1, default: 1000, description: 'most log lines one catch-up sends a watcher; older ones are named in a logs_truncated marker' }),
    maxBacklogBytes: Type.Integer({ minimum: 1024, default: 256 * 1024, description: 'a log watcher with more unread than this (at most half of maxBufferedBytes) skips lines and gets a logs_truncated marker once it has caught up' })
  }, { default: {}, additionalProperties: false }),
  myJobs: Type.Object({
    path: Type.Optional(Type.Union([Type.Literal(false), Type.String({ pattern: '^/' })], { description: 'the caller\'s jobs: GET <path>, and GET <path>/events (SSE feed); default `<routePrefix>/jobs`; false leaves both out' })),
    maxPerOwner: Type.Integer({ minimum: 1, default: 1000, description: 'jobs kept in each owner\'s index per kind; older ones leave the list' }),
    ttlSeconds: Type.Integer({ minimum: 60, default: 30 * 24 * 3600, description: 'an owner\'s index expires after this long without a new job' }),
    feed: Type.Boolean({ default: true, description: 'publish every state change of a job to its owner\'s channel (one PUBLISH per lifecycle event, not per progress report)' })
  }, { default: {}, additionalProperties: false }),
  idempotency: Type.Object({
    windowSeconds: Type.Integer({ minimum: 1, default: 24 * 3600 })
  }, { default: {}, additionalProperties: false }),
  quotas: Type.Object({
    maxActiveJobs: Type.Integer({ minimum: 0, default: 0 }),
    maxJobsPerWindow: Type.Integer({ minimum: 0, default: 0 }),
    windowMs: Type.Integer({ minimum: 1_000, default: 60_000 }),
    activeRetryAfterSeconds: Type.Integer({ minimum: 1, default: 5 })
  }, { default: {}, additionalProperties: false }),
  canAccess: Type.Optional(Fn<CanAccess>('whether a requester may act on a job'))
}, { additionalProperties: false })

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
