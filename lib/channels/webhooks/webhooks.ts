import { Queue, UnrecoverableError, Worker, type Job } from 'bullmq'
import type { FastifyBaseLogger, FastifyInstance, FastifyRequest } from 'fastify'
import type { Redis } from 'ioredis'
import { Webhook } from 'standardwebhooks'
import { finalKey, type BridgeEvent } from '../../bridge/bridge'
import { DeliveryNotFoundError, QueueUnavailableError, WebhookForbiddenError, WebhookUrlRefusedError } from '../../errors'
import type { Keys } from '../../core/keys'
import { jobUpdate } from '../../protocols/jobs'
import { formatVersion } from '../../wire/version'
import { checkEndpointUrl, defaultLookup, RefusedEndpoint, resolveEndpoint, type Lookup } from './address'
import { post } from './http'
import { redactEndpoint } from '../../core/redact'
import { boundClose } from '../../core/bounded-close'
import { kindWebhook, type KindWebhook, type KindWebhookOptions, type ResolvedWebhooks, type WebhookEvent } from './options'
import { errors } from '../../http/schemas'
import { deliveryId, eventOf, retryDelay } from './payload'

export { deliveryId, eventOf, retryDelay }

/** What a delivery job carries: everything needed to send it, even after the job it tells of is gone. */

/** `GET <routePrefix>/dead`: the answer, for OpenAPI and serialization. */
const DeadListSchema = {
  type: 'object',
  properties: {
    total: { type: 'integer' },
    deliveries: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          id: { type: 'string' },
          kind: { type: 'string' },
          job_id: { type: 'string' },
          event: { type: 'string' },
          url: { type: 'string' },
          attempts: { type: 'integer' },
          error: { type: 'string' },
          failed_at: { type: ['integer', 'null'] },
          payload: { description: 'the body that was to be delivered' }
        }
      }
    }
  },
  required: ['total', 'deliveries']
} as const
export interface DeliveryData {
  url: string
  /** The kind's fixed endpoint, set by the operator: not held to the private-address rule. */
  trusted: boolean
  kind: string
  jobId: string
  /** The stream event it tells of (`completed`, `progress` ...). */
  event: string
  /** The JSON body, the same `job_update` the `jobs` protocol sends. */
  payload: string
}

/** A receiver's answer that calls for another try, with the delay it asked for. */
class DeliveryFailed extends Error {
  readonly retryAfterMs: number | null
  constructor (message: string, retryAfterMs: number | null) {
    super(message)
    this.retryAfterMs = retryAfterMs
  }
}

const STATUS_EVENTS = new Set(['waiting', 'delayed', 'active', 'stalled'])
/** How soon the delivery worker tries again after a connection error (BullMQ's `runRetryDelay`). */
export const RUN_RETRY_DELAY_MS = 500
/**
 * At `app.close()`, how long the delivery worker is waited for (a delivery in flight finishing)
 * before its connections are ended: a close during a Redis outage would otherwise wait for Redis.
 */
export const WORKER_CLOSE_MS = 2_000
const MAX_URL_LENGTH = 2048

/** The options webhooks read: each kind's rule and queue, the delivery settings, BullMQ's prefix. */
export interface WebhooksOptionsSlice {
  prefix: string
  kinds: Record<string, { queueName: string, webhook?: KindWebhookOptions }>
  webhooks: ResolvedWebhooks
}

export interface WebhooksContext {
  opts: WebhooksOptionsSlice
  /** For the delivery queue (BullMQ loads its scripts here). */
  connection: Redis
  /** Plain commands: per-upload endpoints, progress throttling. */
  cmd: Redis
  /** Opens a connection of the plugin's own (closed with the plugin), for the delivery worker. */
  connect: () => Redis
  keys: Keys
  log: FastifyBaseLogger
}

/**
 * Webhooks: the bridge hands every job event over once across the cluster; the kinds' rules pick
 * the ones to send, and each becomes one job of a BullMQ delivery queue whose id is derived from
 * the event, so an event handled twice is still delivered once. Every API instance's worker
 * delivers: a crashed instance's deliveries are taken over, retries wait in Redis.
 */
export class Webhooks {
  readonly queue: Queue<DeliveryData>
  readonly #worker: Worker<DeliveryData> | null = null
  readonly #o: ResolvedWebhooks
  readonly #ctx: WebhooksContext
  readonly #kinds = new Map<string, { kind: string, hook: KindWebhook }>()
  readonly #signers: Webhook[]
  readonly #lookup: Lookup
  readonly #pending = new Set<Promise<void>>()

  /** Null when no kind has a webhook. */
  static create (ctx: WebhooksContext): Webhooks | null {
    const kinds = Object.entries(ctx.opts.kinds).filter(([, k]) => k.webhook !== undefined)
    return kinds.length === 0 ? null : new Webhooks(ctx)
  }

  private constructor (ctx: WebhooksContext) {
    this.#ctx = ctx
    this.#o = ctx.opts.webhooks
    for (const [kind, k] of Object.entries(ctx.opts.kinds)) {
      if (k.webhook !== undefined) this.#kinds.set(k.queueName, { kind, hook: kindWebhook(k.webhook) })
    }
    const secrets = this.#o.secret === undefined ? [] : Array.isArray(this.#o.secret) ? this.#o.secret : [this.#o.secret]
    this.#signers = secrets.map(s => new Webhook(s))
    this.#lookup = this.#o.lookup ?? defaultLookup
    this.queue = new Queue<DeliveryData>(this.#o.queueName, { connection: ctx.connection, prefix: ctx.opts.prefix })
    this.queue.on('error', (err: Error) => ctx.log.debug({ err }, 'job-progress: webhook queue error'))
    if (this.#o.worker) {
      const connection = ctx.connect()
      this.#worker = new Worker<DeliveryData>(this.#o.queueName, async (job) => await this.#deliver(job), {
        connection,
        prefix: ctx.opts.prefix,
        concurrency: this.#o.concurrency,
        lockDuration: this.#o.lockDurationMs,
        stalledInterval: this.#o.stalledIntervalMs,
        maxStalledCount: 3,
        // After a lost connection (Redis restarted or paused) BullMQ waits this long before it
        // fetches again or records a finished delivery: by default 15 s, on top of the fault,
        // for every delivery queued meanwhile.
        runRetryDelay: RUN_RETRY_DELAY_MS,
        settings: { backoffStrategy: (attemptsMade, _type, err) => retryDelay(this.#o, attemptsMade, (err as DeliveryFailed | undefined)?.retryAfterMs ?? null) }
      })
      boundClose(this.#worker, { timeoutMs: WORKER_CLOSE_MS, own: [connection] })
      this.#worker.on('error', (err: Error) => ctx.log.debug({ err }, 'job-progress: webhook worker error'))
      this.#worker.on('failed', (job, err) => {
        if (job === undefined) return
        const dead = err instanceof UnrecoverableError || job.attemptsMade >= (job.opts.attempts ?? 1)
        if (dead) ctx.log.warn({ delivery: job.id, url: redactEndpoint(job.data.url), job: job.data.jobId, attempts: job.attemptsMade, reason: err.message }, 'job-progress: webhook delivery gave up; it is listed as dead and can be replayed')
      })
    }
  }

  /** Whether some kind's webhook is sent progress events (the bridge hands those back only then). */
  get wantsProgress (): boolean {
    for (const { hook } of this.#kinds.values()) if (hook.events.includes('progress')) return true
    return false
  }

  /**
   * The bridge's listener. The promise settles once the delivery is in its queue, and the bridge
   * acknowledges the stream entry only then; it rejects when the delivery could not be queued, so
   * the entry stays pending and is replayed (the delivery id makes the replay one delivery).
   */
  async onEvent (event: BridgeEvent): Promise<void> {
    const entry = this.#kinds.get(event.queue)
    if (entry === undefined) return
    const task = this.#enqueue(entry.kind, entry.hook, event)
      .catch((err: Error) => {
        this.#ctx.log.error({ err, job: event.jobId, event: event.event }, 'job-progress: could not schedule a webhook delivery')
        throw err
      })
      .finally(() => this.#pending.delete(task))
    this.#pending.add(task)
    await task
  }

  async #enqueue (kind: string, hook: KindWebhook, e: BridgeEvent): Promise<void> {
    const type: WebhookEvent | null = e.final ? 'final' : e.event === 'progress' ? 'progress' : STATUS_EVENTS.has(e.event) ? 'status' : null
    if (type === null || !hook.events.includes(type)) return
    const { cmd, keys } = this.#ctx
    const urlKey = keys.webhookUrl(e.queue, e.jobId)
    const reads = cmd.pipeline()
    if (hook.allow !== undefined) reads.get(urlKey)
    // The completed entry has the result but not the final count: the job hash still has it, when kept.
    if (e.event === 'completed') reads.hget(keys.job(e.queue, e.jobId), 'progress')
    // A job stopped by a cancel fails: its cancellation mark tells it apart, as for the sockets.
    if (e.event === 'failed') reads.exists(keys.cancel(e.queue, e.jobId))
    // A final's delivery id names its attempt; an entry of BullMQ's does not say it: the job does.
    const readAttempt = e.final && e.attempt === undefined
    if (readAttempt) reads.hmget(keys.job(e.queue, e.jobId), 'ats', 'atm')
    // A read Redis refused fails the listener (the bridge calls it again) instead of passing for
    // "nothing there": a final sent with no counts, or a cancel taken for a failure.
    const read = reads.length === 0 ? [] : await reads.exec() ?? []
    const replies = read.map(([err, value]) => {
      if (err !== null) throw err
      return value as string | number | null | Array<string | null>
    })
    const perUpload = hook.allow !== undefined ? replies.shift() as string | null ?? null : null
    const progress = e.event === 'completed' ? replies.shift() as string | null ?? null : null
    if (e.event === 'failed' && replies.shift() === 1) e = { ...e, event: 'cancelled' }
    // As the snapshot counts it: the attempts started or made, whichever is more. A job already
    // removed (removeOnComplete) has none to read: 0, and a gap's recovery never finds it either.
    const started = readAttempt ? replies.shift() as Array<string | null> | null : null
    const attempt = e.attempt ?? (started === null || (started[0] === null && started[1] === null) ? 0 : Math.max(Number(started[0] ?? 0), Number(started[1] ?? 0), 1))
    const targets: Array<{ url: string, trusted: boolean }> = []
    if (hook.url !== undefined) targets.push({ url: hook.url, trusted: true })
    if (perUpload !== null) targets.push({ url: perUpload, trusted: false })
    if (targets.length === 0) return
    if (type === 'progress') {
      // At most one progress delivery per job and interval, across the cluster.
      const ms = Math.round(hook.progressIntervalSeconds * 1000)
      const first = await cmd.set(keys.webhookProgress(e.queue, e.jobId), '1', 'PX', ms, 'NX')
      if (first === null) return
    }
    const event = eventOf(kind, e, progress)
    if (event === null) return
    // Every payload carries the job's version: a final's attempt is the one its delivery id names
    // (read above, or carried by a recovered or cancelled entry); other events' is the one their
    // entry says (1 when it says none). The entry id is the event's own.
    if (e.final && attempt > 0) event.attempt = attempt
    event.version ??= formatVersion(event.attempt, e.id)
    const payload = JSON.stringify(jobUpdate(event))
    await Promise.all(targets.map(async ({ url, trusted }) => {
      const id = deliveryId(e.queue, e.jobId, e.final ? finalKey(e.event, attempt) : e.id, url)
      await this.queue.add('deliver', { url, trusted, kind, jobId: e.jobId, event: e.event, payload }, {
        jobId: id,
        attempts: this.#o.attempts,
        backoff: { type: 'webhook' },
        removeOnComplete: { age: this.#o.keepDeliveredSeconds },
        removeOnFail: { age: this.#o.keepDeadSeconds }
      })
    }))
    // The endpoint is kept a little longer than the job, for a final event handled twice.
    if (e.final && perUpload !== null) await cmd.expire(urlKey, 3600)
  }

  async #deliver (job: Job<DeliveryData>): Promise<{ status: number }> {
    const d = job.data
    const url = new URL(d.url)
    let addresses
    try {
      addresses = await resolveEndpoint(url, this.#lookup, d.trusted || this.#o.allowPrivateAddresses)
    } catch (err) {
      // The name now leads somewhere it may not: retrying would only knock again.
      if (err instanceof RefusedEndpoint) throw new UnrecoverableError(`refused: ${err.message}`)
      throw err
    }
    const id = job.id as string
    // Signed anew on every try: receivers reject old timestamps; the id stays the same.
    const now = new Date()
    const body = d.payload
    const result = await post({
      url,
      addresses,
      body,
      headers: {
        'webhook-id': id,
        'webhook-timestamp': String(Math.floor(now.getTime() / 1000)),
        'webhook-signature': this.#signers.map(s => s.sign(id, now, body)).join(' '),
        'user-agent': 'fastify-job-progress-webhooks'
      },
      connectTimeoutMs: this.#o.connectTimeoutMs,
      timeoutMs: this.#o.timeoutMs,
      maxResponseBytes: this.#o.maxResponseBytes
    })
    if (result.status >= 200 && result.status < 300) return { status: result.status }
    const said = result.body === '' ? '' : `: ${result.body.slice(0, 200)}`
    if (result.status === 410) {
      this.#ctx.log.warn({ delivery: id, url: redactEndpoint(d.url), job: d.jobId }, 'job-progress: webhook receiver answered 410 Gone; no more attempts for this delivery')
      throw new UnrecoverableError(`HTTP 410 Gone${said}`)
    }
    const redirect = result.status >= 300 && result.status < 400 ? ' (redirects are not followed)' : ''
    throw new DeliveryFailed(`HTTP ${result.status}${redirect}${said}`, result.retryAfterMs)
  }

  /**
   * The upload's check of a per-upload endpoint, before its job is added: refused with a 400 that
   * says why; kept in the queue's key space (the job's cluster slot) for the bridge to find.
   */
  beforeAdd (kind: string): ((jobId: string, fields: Record<string, string>) => Promise<void>) | undefined {
    const k = this.#ctx.opts.kinds[kind]
    if (k.webhook === undefined) return undefined
    const hook = kindWebhook(k.webhook)
    const queue = k.queueName
    return async (jobId, fields) => {
      const value = fields[hook.field]
      if (value === undefined || value === '') return
      if (hook.allow === undefined) throw new WebhookUrlRefusedError(`jobs of kind "${kind}" do not take a per-upload webhook (field "${hook.field}")`)
      if (value.length > MAX_URL_LENGTH) throw new WebhookUrlRefusedError(`it is longer than ${MAX_URL_LENGTH} characters`)
      try {
        const url = checkEndpointUrl(value, hook.allow, hook.allowHttp)
        await resolveEndpoint(url, this.#lookup, this.#o.allowPrivateAddresses)
        await this.#ctx.cmd.set(this.#ctx.keys.webhookUrl(queue, jobId), url.href, 'EX', this.#o.urlTtlSeconds)
      } catch (err) {
        if (err instanceof RefusedEndpoint) throw new WebhookUrlRefusedError(err.message)
        this.#ctx.log.warn({ err }, 'job-progress: could not keep a per-upload webhook endpoint')
        throw new QueueUnavailableError()
      }
    }
  }

  /** `GET <prefix>/dead` lists dead deliveries, newest first; `POST <prefix>/dead/:id/replay` sends one again. */
  registerRoutes (fastify: FastifyInstance): void {
    const authorize = this.#o.authorize
    if (authorize === undefined) return
    const prefix = this.#o.routePrefix
    const check = async (request: FastifyRequest): Promise<void> => {
      if (await authorize(request) !== true) throw new WebhookForbiddenError()
    }
    fastify.get(`${prefix}/dead`, {
      schema: {
        summary: 'Dead webhook deliveries',
        querystring: { type: 'object', properties: { offset: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: 500, default: 50 } } },
        response: { 200: DeadListSchema, ...errors(403) }
      }
    }, async (request) => {
      await check(request)
      const { offset, limit } = request.query as { offset: number, limit: number }
      const [jobs, total] = await Promise.all([this.queue.getFailed(offset, offset + limit - 1), this.queue.getFailedCount()])
      return {
        total,
        deliveries: jobs.filter(j => j !== undefined).map(j => ({
          id: j.id,
          kind: j.data.kind,
          job_id: j.data.jobId,
          event: j.data.event,
          url: j.data.url,
          attempts: j.attemptsMade,
          error: j.failedReason,
          failed_at: j.finishedOn ?? null,
          payload: JSON.parse(j.data.payload) as unknown
        }))
      }
    })
    fastify.post(`${prefix}/dead/:id/replay`, {
      schema: {
        summary: 'Replay a dead webhook delivery',
        params: { type: 'object', properties: { id: { type: 'string', maxLength: 64 } }, required: ['id'] },
        response: { 202: { type: 'object', properties: { id: { type: 'string' }, status: { type: 'string', enum: ['queued'] } }, required: ['id', 'status'] }, ...errors(403, 404) }
      }
    }, async (request, reply) => {
      await check(request)
      const { id } = request.params as { id: string }
      const job = await this.queue.getJob(id)
      if (job === undefined || await job.getState() !== 'failed') throw new DeliveryNotFoundError()
      // A full set of tries again, under the same delivery id, so receivers still deduplicate.
      await job.retry('failed', { resetAttemptsMade: true, resetAttemptsStarted: true })
      return await reply.code(202).send({ id, status: 'queued' })
    })
  }

  /** Waits for deliveries being scheduled, then stops the worker (a delivery in flight finishes). */
  async close (): Promise<void> {
    await Promise.allSettled([...this.#pending])
    await this.#worker?.close().catch(() => {})
    await this.queue.close().catch(() => {})
  }
}
