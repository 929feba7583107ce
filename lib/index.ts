import fastifyCookie from '@fastify/cookie'
import fastifyMultipart from '@fastify/multipart'
import fastifyWebsocket from '@fastify/websocket'
import { Queue } from 'bullmq'
import type { FastifyPluginAsync, FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { Redis, type Cluster, type ClusterOptions, type RedisOptions } from 'ioredis'
import { createBroker } from './broker/create-broker'
import { isCluster } from './core/redis-client'
import { randomUUID } from 'node:crypto'
import type { WebSocket } from 'ws'
import { Bridge, everyListener, recordCreated, type BridgeEvent } from './bridge/bridge'
import { ConnectionLimit } from './session/connection-limit'
import { whenReady } from './core/redis-ready'
import { UploadCleanup } from './http/uploads/upload-cleanup'
import { LostUploads, removeOwnPartials } from './http/uploads/leftovers'
import { redactedRequest } from './core/redact'
import * as errors from './errors'
import { CloseCodes } from './errors'
import { Hub } from './hub/hub'
import { clusterKeyProblem, Keys } from './core/keys'
import { resolveOptions, routePlaces, type JobProgressOptions, type ResolvedOptions } from './options'
import { claimRoutes, namedRouteError } from './http/route-claims'
import { Owners } from './http/auth/identity'
import { progressProtocol } from './protocols/progress'
import type { ProtocolDefinition } from './protocols/types'
import { registerJobRoutes } from './http/jobs/job-routes'
import { registerManageRoutes } from './http/jobs/manage-routes'
import { noBodyValidation, uploadSchema } from './http/schemas'
import { Session, type SessionContext } from './session/session'
import { SessionSet, startSessionTimers } from './session/timers'
import { registerSseRoutes } from './transports/sse'
import { registerClientRoute } from './http/client-route'
import { releaseUpgrade, socketErrorHandler, WebSocketTransport } from './transports/websocket'
import { readOwner, readOwners, readSnapshots, writeOwner, type Snapshot } from './core/snapshot'
import { DiskStorage, type Storage } from './core/storage'
import { acceptedBody, uploadHandler, uploadShutdown } from './http/uploads/upload-route'
import { ownerOnly } from './core/access'
import type { AdmissionContext } from './http/create/admission'
import { createJob, registerCreateRoute, type CreateKind, type EnqueueInput, type EnqueueResult } from './http/create/enqueue'
import { Idempotency } from './http/create/idempotency'
import { Quotas } from './http/create/quotas'
import { registerHealth } from './http/health'
import { registerLongIdRoutes } from './http/long-ids'
import { trackConnections } from './http/connections'
import { quitWithin, REDIS_WAIT_MS, settlesWithin } from './core/bounded-close'
import { noTelemetry, type Telemetry } from './core/telemetry'
import { createTracing, noTracing } from './core/tracing'
import { metricsRoute, prometheusTelemetry, resolveMetrics, teeTelemetry } from './core/metrics'
import { Webhooks } from './channels/webhooks/webhooks'
import { LiveLogs } from './channels/logs/live-logs'
import { readLogs } from './channels/logs/job-logs'
import { LiveStreams, STREAM_BACKLOG_BYTES } from './channels/streams/live-streams'
import { readStream } from './channels/streams/stream-store'
import { registerStreamRoutes } from './http/jobs/stream-routes'
import { MyJobs, registerMyJobsRoutes } from './channels/my-jobs/my-jobs'
import { OwnerIndex } from './channels/my-jobs/owner-index'

/** What the plugin adds to the Fastify instance as `fastify.jobProgress`. */
export interface JobProgress {
  /** This instance's id: the bridge's consumer name. */
  readonly instanceId: string
  /** The BullMQ queue of each kind. */
  readonly queues: ReadonlyMap<string, Queue>
  readonly storage: Storage
  readonly keys: Keys
  /** A job's current state, or null when it does not exist. */
  getJob: (kind: string, jobId: string) => Promise<Snapshot | null>
  /** Counts for health checks and tests. */
  stats: () => { sockets: number, watchedJobs: number, relayed: number, relayedLocally: number }
  /** Whether the plugin's Redis command connection is up. */
  redisReady: () => boolean
  /**
   * Creates a job from server code, with the same owner check, idempotency keys, quotas and
   * answer as an upload (throws the same errors).
   */
  enqueue: (kind: string, input: EnqueueInput) => Promise<EnqueueResult>
}

declare module 'fastify' {
  interface FastifyInstance {
    jobProgress: JobProgress
  }
}

function isRedis (value: unknown): value is Redis {
  return value !== null && typeof value === 'object' && typeof (value as Redis).duplicate === 'function'
}

const plugin: FastifyPluginAsync<JobProgressOptions> = async function jobProgress (fastify, options) {
  const opts: ResolvedOptions = resolveOptions(options)
  // Before any connection is opened: a refusal later would leave them behind.
  claimRoutes(fastify, routePlaces(opts))
  const log = fastify.log
  const instanceId = opts.instanceId ?? randomUUID()
  const metrics = resolveMetrics(opts.metrics)
  const backends: Telemetry[] = []
  if (opts.telemetry !== undefined) backends.push(opts.telemetry)
  if (metrics !== null) backends.push(prometheusTelemetry(metrics.registry, metrics.prefix))
  const telemetry = backends.length === 0 ? noTelemetry : teeTelemetry(backends)
  const tracing = opts.tracing ? createTracing() : noTracing

  // Connections: the caller's command client is used as it is and left open at close; every
  // other connection is ours. One connection only SUBSCRIBEs, one only blocks on the bridge.
  const owned: Redis[] = []
  const own = <R extends Redis>(redis: R): R => {
    owned.push(redis)
    redis.on('error', (err: Error) => log.debug({ err }, 'job-progress: redis connection error'))
    return redis
  }
  const connection = opts.connection as Redis | RedisOptions | string
  const redis = isRedis(connection)
    ? connection
    // Fail fast while Redis is down: an upload answers 503 instead of waiting on a reconnect.
    : own(typeof connection === 'string'
      ? new Redis(connection, { enableOfflineQueue: false, maxRetriesPerRequest: 2 })
      : new Redis({ ...connection, enableOfflineQueue: false, maxRetriesPerRequest: 2 }))
  // BullMQ loads its Lua scripts onto the queues' connection, and ioredis copies every one of them
  // into each pipeline made on it: the plugin's own reads and publishes use a plain connection.
  // A Cluster answers the same commands; it is typed as a client below and told apart at run
  // time where it matters (pipelines per slot, sharded pub/sub). Its duplicate() takes start
  // nodes and cluster options instead of client options.
  const clustered = isCluster(redis)
  if (clustered) {
    const problem = clusterKeyProblem(opts.prefix, Object.values(opts.kinds).map(k => k.queueName))
    if (problem !== null) throw new errors.InvalidOptionError(problem)
  }
  const dup = (clientOptions: RedisOptions, clusterOptions: ClusterOptions = {}): Redis => clustered
    ? (redis as unknown as Cluster).duplicate([], clusterOptions) as unknown as Redis
    : redis.duplicate(clientOptions)
  const cmd = own(dup({ enableOfflineQueue: false, maxRetriesPerRequest: 2 }))
  const subscriber = own(dup({ enableOfflineQueue: true, maxRetriesPerRequest: null }, { shardedSubscribers: true }))
  const broker = createBroker(cmd, subscriber, opts.pubsub)
  const ready = await Promise.all([whenReady(redis, 5_000), whenReady(cmd, 5_000)])
  if (!ready.every(Boolean)) log.warn('job-progress: Redis is not reachable yet; uploads answer 503 until it is')

  const keys = new Keys(opts)
  const storage = opts.storage ?? new DiskStorage(opts.uploadDir)
  const owners = new Owners(opts, log)
  const queues = new Map<string, Queue>()
  for (const [kind, k] of Object.entries(opts.kinds)) {
    const queue = new Queue(k.queueName, { connection: redis, prefix: opts.prefix, defaultJobOptions: { ...opts.defaultJobOptions, ...k.jobOptions }, telemetry: tracing.bullmq })
    queue.on('error', (err: Error) => log.debug({ err }, 'job-progress: queue error'))
    // The owner gets a field of its own, so ownership checks read it alone (not the job's data).
    queue.on('waiting', (job: { id?: string, data?: { owner?: unknown } }) => {
      if (typeof job.id === 'string' && typeof job.data?.owner === 'string') {
        writeOwner(redis, keys, queue.name, job.id, job.data.owner).catch((err: Error) => log.debug({ err }, 'job-progress: cannot store the owner field; data.owner is read instead'))
      }
    })
    queues.set(kind, queue)
  }

  const hub = new Hub({ redis: cmd, broker, keys, throttleMs: opts.throttleMs, sweepPeriodMs: opts.sweepPeriodMs, sweepReadsPerSecond: opts.sweepReadsPerSecond, telemetry, tracing, log, onJobLost: (target) => { lostUploads.lost(target.queue, target.jobId) } })
  // Parts that act once per job event across the cluster (upload cleanup, webhooks) listen here.
  const bridgeListeners: Array<(event: BridgeEvent) => void | Promise<void>> = []
  const cleanup = new UploadCleanup({ ...opts.files, redis: cmd, keys, storage, queueOf: (kind) => opts.kinds[kind]?.queueName, queues: [...queues.values()].map(q => q.name), log })
  bridgeListeners.push((event) => cleanup.onEvent(event))
  // Partial files carry their writer's id: those of an earlier run under this id are leftovers.
  await removeOwnPartials(storage, instanceId, log)
  const lostUploads = new LostUploads({ redis: cmd, keys, storage, release: async (queue, jobId) => { await cleanup.release(queue, jobId, Date.now()) }, log })
  cleanup.start()
  const uploadStorage = cleanup.tracked()
  const webhooks = Webhooks.create({ opts, connection: redis, cmd, connect: () => own(redis.duplicate({ enableOfflineQueue: true, maxRetriesPerRequest: null })), keys, log })
  if (webhooks !== null) bridgeListeners.push(async event => { await webhooks.onEvent(event) })
  const kindOfQueue = new Map([...queues].map(([kind, queue]) => [queue.name, kind]))
  const ownerIndex = new OwnerIndex(cmd, keys, opts.myJobs)
  const myJobs = new MyJobs({ redis: cmd, broker, keys, index: ownerIndex, kindOf: (queue) => kindOfQueue.get(queue), feed: opts.myJobs.feed, log })
  bridgeListeners.push(async event => { await myJobs.onEvent(event) })
  let bridge: Bridge | null = null
  let bridgeReady = (): boolean | null => null
  if (opts.bridge.enabled) {
    const blocking = own(dup({ enableOfflineQueue: true, maxRetriesPerRequest: null }, { redisOptions: { ...(redis as unknown as Cluster).options?.redisOptions, maxRetriesPerRequest: null } }))
    bridgeReady = () => blocking.status === 'ready'
    // Events this instance's bridge publishes from Node (a cluster, claimed entries) reach its own
    // sockets at once; the copy that comes back on the channel is dropped as not newer.
    bridge = new Bridge({ ...opts.bridge, redis: cmd, blocking, keys, queues: [...queues.values()].map(q => q.name), consumer: instanceId, log, telemetry, broker, local: (channel, payload) => hub.relay(channel, payload), onEvent: everyListener(bridgeListeners), progressListeners: webhooks?.wantsProgress === true, recordRetentionMs: opts.cancelTtlSeconds * 1000 })
    await bridge.start()
  }

  // Sockets close with 1001 before @fastify/websocket closes the rest: this hook is added first.
  const sessions = new SessionSet()
  telemetry.gauge('socketsOpen', () => {
    const by = new Map<string, number>()
    for (const session of sessions) by.set(session.protocol.name, (by.get(session.protocol.name) ?? 0) + 1)
    return [...by].map(([protocol, n]) => [{ protocol }, n])
  })
  if (metrics !== null && metrics.path !== false) metricsRoute(fastify, metrics.path, metrics.registry)
  fastify.addHook('preClose', async () => {
    for (const session of sessions) session.close(CloseCodes.goingAway, 'server shutting down')
  })
  // Registered here, @fastify/websocket runs its default error handler: every socket shares one
  // function that does the same (see releaseUpgrade).
  let onSocketError: ((this: WebSocket, err: Error) => void) | undefined
  if (!fastify.hasDecorator('websocketServer')) {
    await fastify.register(fastifyWebsocket, { options: { maxPayload: opts.maxPayload } })
    onSocketError = socketErrorHandler(log)
  }
  if (!fastify.hasRequestDecorator('isMultipart')) await fastify.register(fastifyMultipart)
  if (!fastify.hasRequestDecorator('cookies')) await fastify.register(fastifyCookie)

  // Every route the plugin adds below logs its request without credentials (`?api_key=` ...),
  // and at close its connections still open after the grace are ended (see Connections).
  const connections = trackConnections(fastify, opts.uploads.shutdownGraceMs)
  let ownRoutes = true
  fastify.addHook('onRoute', (route) => {
    if (!ownRoutes) return
    route.logSerializers = { ...route.logSerializers, req: redactedRequest }
    connections.adopt(route)
  })

  const connectionLimit = new ConnectionLimit({ redis: cmd, keys, instanceId, max: opts.maxConnectionsPerOwner, heartbeatMs: opts.instanceHeartbeatMs, log })
  await connectionLimit.start()
  const canAccess = opts.canAccess ?? ownerOnly
  const admission: AdmissionContext = { idempotency: new Idempotency(cmd, keys, opts.idempotency.windowSeconds), quotas: new Quotas(cmd, keys, opts.quotas), log, onCreated: async (queue, kind, jobId, owner) => { await Promise.all([myJobs.created(queue, kind, jobId, owner), recordCreated(cmd, keys, queue, jobId, opts.cancelTtlSeconds * 1000)]) } }
  const creators = new Map<string, CreateKind>()
  const queueOf = (kind: string): string | undefined => opts.kinds[kind]?.queueName
  const ctx: SessionContext = {
    hub,
    owners,
    queueOf,
    kinds: [...queues.keys()].map(kind => ({ kind, queue: queueOf(kind) as string })),
    ownersOf: async (targets) => await readOwners(cmd, keys, targets),
    sessions,
    connectionLimit,
    maxConnectionsPerOwner: opts.maxConnectionsPerOwner,
    maxSubscriptionsPerConnection: opts.maxSubscriptionsPerConnection,
    maxPayload: opts.maxPayload,
    maxBufferedBytes: opts.maxBufferedBytes,
    firstMessageTimeoutMs: opts.firstMessageTimeoutMs,
    inbound: opts.inbound,
    log,
    canAccess,
    ownerOf: async (target) => await readOwner(cmd, keys, target),
    logs: {
      feeds: new LiveLogs(broker),
      channel: (target) => keys.channel(target.queue, target.jobId),
      read: async (target, from, limit) => await readLogs(cmd, keys, target.queue, target.jobId, from, limit),
      ...opts.liveLogs
    },
    streams: {
      feeds: new LiveStreams(broker),
      channel: (target) => keys.channel(target.queue, target.jobId),
      read: async (target, name, from, limit) => await readStream(cmd, keys, target.queue, target.jobId, name, from, limit),
      maxBacklogBytes: STREAM_BACKLOG_BYTES
    },
    mine: { watch: async (owner, receive) => await myJobs.watch(owner, receive) }
  }

  const inflightUploads = uploadShutdown(fastify, opts)
  const routeCtx = { redis: cmd, keys, owners, storage, cancelTtlSeconds: opts.cancelTtlSeconds, canAccess, details: opts.progressDetails }
  const protocols: ProtocolDefinition[] = [progressProtocol(opts.wsPrefix, { version: opts.progressVersion, details: opts.progressDetails }), ...opts.protocols]
  for (const [kind, queue] of queues) {
    const k = opts.kinds[kind]
    const basePath = k.basePath
    const wsPath = (jobId: string): string => `${opts.wsPrefix}/${kind}/${jobId}`
    const countUpload = {
      onResponse: async (_request: FastifyRequest, reply: { statusCode: number }) => {
        const ok = reply.statusCode < 300
        telemetry.count('uploads', { outcome: ok ? 'accepted' : 'refused', reason: ok ? 'ok' : String(reply.statusCode) })
      }
    }
    const creator: CreateKind = {
      kind,
      queue,
      queueReady: () => redis.status === 'ready',
      statusUrl: (jobId) => `${basePath}/${jobId}/status`,
      wsPath,
      beforeAdd: webhooks?.beforeAdd(kind)
    }
    creators.set(kind, creator)
    fastify.post(k.uploadPath, { ...countUpload, schema: uploadSchema(kind, k.accept ?? []), validatorCompiler: noBodyValidation }, uploadHandler({
      ...creator,
      accept: k.accept ?? [],
      maxFileSize: k.maxFileSize ?? opts.limits.fileSize,
      admission,
      writer: instanceId
    }, opts, owners, uploadStorage, inflightUploads))
    if (k.create !== undefined) registerCreateRoute(fastify, opts, owners, admission, creator, basePath, k.create)
    registerJobRoutes(fastify, routeCtx, { kind, queue, basePath })
    registerManageRoutes(fastify, routeCtx, { kind, queue, basePath, uploads: uploadStorage })
    registerStreamRoutes(fastify, routeCtx, { kind, queue: queue.name, basePath })
  }
  registerLongIdRoutes(fastify, [...queues.keys()].map(kind => opts.kinds[kind].basePath), [...queues.keys()].map(kind => `${opts.wsPrefix}/${kind}`))
  registerSseRoutes(fastify, ctx, {
    kinds: [...queues.keys()].map(kind => ({ kind, basePath: opts.kinds[kind].basePath })),
    path: opts.ssePath,
    retryMs: opts.sseRetryMs,
    maxSubscriptionsPerConnection: opts.maxSubscriptionsPerConnection
  })
  if (opts.myJobs.path !== false) registerMyJobsRoutes(fastify, { path: opts.myJobs.path, owners, index: ownerIndex, kinds: [...queues].map(([kind, queue]) => ({ kind, queue: queue.name })), session: ctx, feed: myJobs, retryMs: opts.sseRetryMs })
  if (opts.clientRoute !== false) registerClientRoute(fastify, opts.clientRoute)
  webhooks?.registerRoutes(fastify)
  for (const protocol of protocols) {
    const paths = protocol.perJob === true ? [...queues.keys()].map(kind => ({ path: `${protocol.path}/${kind}/:jobId`, kind })) : [{ path: protocol.path, kind: undefined }]
    for (const { path, kind } of paths) {
      fastify.get(path, { websocket: true }, (socket: WebSocket, request: FastifyRequest) => {
        releaseUpgrade(socket, request, onSocketError)
        const jobs = kind === undefined ? [] : [{ kind, jobId: (request.params as { jobId: string }).jobId }]
        // eslint-disable-next-line no-new
        new Session(ctx, protocol, new WebSocketTransport(socket, request.id), request, jobs)
      })
    }
  }

  ownRoutes = false

  const stopTimers = startSessionTimers(sessions, { ...opts, log, telemetry })

  fastify.decorate('jobProgress', {
    instanceId,
    queues,
    storage,
    keys,
    async getJob (kind: string, jobId: string) {
      const queue = queueOf(kind)
      if (queue === undefined) return null
      const [snapshot] = await readSnapshots(cmd, keys, [{ kind, queue, jobId }], true)
      return snapshot
    },
    stats: () => ({ sockets: sessions.size, watchedJobs: hub.watchedCount, relayed: bridge?.published ?? 0, relayedLocally: hub.relayedLocally }),
    redisReady: () => redis.status === 'ready' && cmd.status === 'ready',
    async enqueue (kind: string, input: EnqueueInput) {
      const creator = creators.get(kind)
      if (creator === undefined) throw new errors.InvalidOptionError(`unknown kind "${kind}"`)
      const { jobId, created } = await createJob(admission, creator, input)
      const answer = acceptedBody(creator, opts, fastify.prefix, jobId)
      return { jobId, statusUrl: answer.status_url, wsUrl: answer.ws_url, created }
    }
  } satisfies JobProgress)
  registerHealth(fastify, opts, () => bridgeReady())

  fastify.addHook('onClose', async () => {
    stopTimers()
    // A paused Redis answers nothing: what it is asked here (slots given back, the consumer group
    // left, removals) is waited for a bounded time; the connections are ended below anyway.
    await settlesWithin((async () => {
      await connectionLimit.close()
      await bridge?.close()
      await lostUploads.settled()
      await cleanup.close()
    })(), REDIS_WAIT_MS)
    await webhooks?.close()
    hub.close()
    myJobs.close()
    await Promise.all([...queues.values()].map(async q => await q.close().catch(() => {})))
    // A QUIT to a node that died (a failed-over cluster master) or is paused would wait for ever.
    await Promise.all(owned.map(async r => { await quitWithin(r, REDIS_WAIT_MS) }))
  })
}

/** The plugin. Register it with `app.register(jobProgress, { kinds: { ... } })`. */
export const jobProgress = fp(async function jobProgress (fastify, options: JobProgressOptions) {
  try {
    await plugin.call(fastify, fastify, options)
  } catch (err) {
    // A route with parameters the app also has: Fastify's error, told which option moves ours.
    throw namedRouteError(err, fastify.prefix, routePlaces(resolveOptions(options)))
  }
} satisfies FastifyPluginAsync<JobProgressOptions>, { fastify: '5.x', name: 'fastify-job-progress' })
export default jobProgress

export { errors }
export { DiskStorage } from './core/storage'
export type { Storage, StoredFileInfo } from './core/storage'
export type { JobProgressOptions, KindOptions } from './options'
export type { JobEvent, JobState } from './core/event'
export type { Snapshot } from './core/snapshot'
export type { UploadJobData } from './core/job-data'
export { progressProtocol, progressMessage, type ProgressMessage } from './protocols/progress'
export { jobsProtocol, jobUpdate, type JobsProtocolOptions } from './protocols/jobs'
export type { LogLineMessage, LogsTruncatedMessage, LogMessage, MyJobMessage, MyJobsResyncMessage } from './wire/messages'
export type { ListedJob } from './channels/my-jobs/owner-index'
export { defineProtocol, type ProtocolDefinition, type ClientAction, type ServerMessage } from './protocols/types'
export { createJobWorker, type JobWorkerOptions, type JobContext, JobCancelledError } from './worker/worker'
export { openJobStream, readJobStream, StreamBackpressureError, StreamLimitError, STREAM_LIMITS, type JobStream, type OpenJobStreamOptions, type StreamLimits, type StreamRead } from './worker/stream'
export type { StreamMessage, StreamChunkMessage, StreamEndMessage, StreamTruncatedMessage } from './wire/streams'
export { Keys, isJobId } from './core/keys'
export type { BridgeEvent } from './bridge/bridge'
export type { KindWebhookOptions, WebhooksOptions } from './channels/webhooks/options'
export type { AccessJob, CanAccess, JobAction } from './core/access'
export type { CreateRouteOptions, EnqueueInput, EnqueueResult, FileReference } from './http/create/enqueue'
export type { QuotaOptions } from './http/create/quotas'
export type { OutputFile } from './core/outputs'
