// The TypeBox schema of the plugin's options: every default spelled once, here. lib/options.ts
// applies it (resolveOptions) and derives the option types from it; nothing else imports this.
import { Type } from '@sinclair/typebox'
import type { FastifyRequest } from 'fastify'
import type { JobsOptions } from 'bullmq'
import type { Cluster, Redis, RedisOptions } from 'ioredis'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Storage } from './core/storage'
import type { CanAccess } from './core/access'
import type { CreateRouteOptions } from './http/create/enqueue'
import type { ProtocolDefinition } from './protocols/types'
import type { MetricsOptions } from './core/metrics'
import type { Telemetry } from './core/telemetry'
import { INBOUND_DEFAULTS } from './session/inbound'
import { KindWebhookSchema, WebhooksSchema } from './channels/webhooks/options'

/** A function-valued option: TypeBox checks it is a function, TypeScript gives its signature. */
function Fn<T> (description: string) {
  return Type.Unsafe<T>(Type.Any({ description, [Symbol.for('jp.fn')]: true }))
}

/** A kind's name becomes part of its routes and queue, so it is kept to URL- and key-safe characters. */
export const KIND_NAME = '^[A-Za-z0-9][A-Za-z0-9_.-]*$'

export const KindSchema = Type.Object({
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
