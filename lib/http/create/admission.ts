import type { FastifyBaseLogger, FastifyReply } from 'fastify'
import type { Queue } from 'bullmq'
import { QueueUnavailableError } from '../../errors'
import type { Idempotency } from './idempotency'
import type { Quotas } from './quotas'

/** What every way of creating a job (upload, JSON route, server code) shares. */
export interface AdmissionContext {
  idempotency: Idempotency
  quotas: Quotas
  log: FastifyBaseLogger
  /** Told of every job once it was added (the owner index and the owner's feed); errors are logged. */
  onCreated?: (queue: string, kind: string, jobId: string, owner: string) => Promise<void>
}

export interface JobRequest {
  queue: Queue
  kind: string
  jobId: string
  owner: string
  data: Record<string, unknown>
  /** The request's `Idempotency-Key`, if any. */
  idempotencyKey?: string
  /** A digest of the request's input, asked for only when it has an idempotency key. */
  digest?: () => Promise<string>
  /** Checks run just before the job is added (webhook URLs ...); throws to refuse. */
  beforeAdd?: () => Promise<void>
  /** Gets `Retry-After` when a quota refuses. */
  reply?: FastifyReply
}

/**
 * Adds a job once its request passed the idempotency key, the owner's quotas and the kind's
 * checks, in that order: a repeated request is answered with its first job before any quota is
 * counted again, and of two raced with one key the key is claimed before a quota slot is taken,
 * so the loser is answered with the winner's job, never refused for the slot the winner holds. Resolves with the job that answers the request: `created` false means an
 * earlier request with the same key made it, and the caller drops what it stored for this one.
 * Whatever refuses after a slot or a key was taken gives it back.
 */
export async function admitJob (ctx: AdmissionContext, r: JobRequest): Promise<{ jobId: string, created: boolean }> {
  try {
    return await admit(ctx, r)
  } catch (err) {
    // Our own refusals carry a status; anything else is Redis failing under us.
    if (typeof (err as { statusCode?: unknown }).statusCode === 'number') throw err
    ctx.log.warn({ err }, 'job-progress: cannot admit the job')
    throw new QueueUnavailableError()
  }
}

/**
 * Refuses early, before a body is read, when the owner is already at a quota (sets `Retry-After`).
 * Not a request whose `Idempotency-Key` is already claimed: it is a repeat, answered with the
 * first request's job (which may hold the owner's last slot), never refused for it.
 */
export async function precheckQuota (ctx: AdmissionContext, queue: string, owner: string, reply: FastifyReply, idempotencyKey?: string): Promise<void> {
  try {
    if (idempotencyKey !== undefined && ctx.quotas.enabled && await ctx.idempotency.held(queue, owner, idempotencyKey)) return
    await ctx.quotas.check(queue, owner)
  } catch (err) {
    const retryAfter = (err as { retryAfter?: number }).retryAfter
    if (retryAfter === undefined) {
      // Redis trouble here is left to the admission, which answers it.
      ctx.log.debug({ err }, 'job-progress: quota pre-check failed')
      return
    }
    reply.header('retry-after', String(retryAfter))
    throw err
  }
}

async function admit (ctx: AdmissionContext, r: JobRequest): Promise<{ jobId: string, created: boolean }> {
  const queue = r.queue.name
  let digest: string | null = null
  if (r.idempotencyKey !== undefined) {
    digest = await (r.digest?.() ?? Promise.resolve(''))
    const earlier = await ctx.idempotency.lookup(queue, r.owner, r.idempotencyKey, digest)
    if (earlier !== null) return { jobId: earlier, created: false }
  }
  let claimed = false
  if (r.idempotencyKey !== undefined && digest !== null) {
    const holder = await ctx.idempotency.claim(queue, r.owner, r.idempotencyKey, digest, r.jobId)
    if (holder !== r.jobId) return { jobId: holder, created: false }
    claimed = true
  }
  try {
    await ctx.quotas.admit(queue, r.owner, r.jobId)
  } catch (err) {
    if (claimed) await ctx.idempotency.release(queue, r.owner, r.idempotencyKey as string, r.jobId).catch(() => {})
    const retryAfter = (err as { retryAfter?: number }).retryAfter
    if (retryAfter !== undefined) r.reply?.header('retry-after', String(retryAfter))
    throw err
  }
  try {
    await r.beforeAdd?.()
    try {
      await r.queue.add(r.kind, r.data, { jobId: r.jobId })
    } catch (err) {
      ctx.log.warn({ err }, 'job-progress: could not add the job')
      throw new QueueUnavailableError()
    }
  } catch (err) {
    await ctx.quotas.release(queue, r.owner, r.jobId).catch(() => {})
    if (claimed) await ctx.idempotency.release(queue, r.owner, r.idempotencyKey as string, r.jobId).catch(() => {})
    throw err
  }
  // The job exists: requests waiting on the key may now be answered with it. Should this write
  // fail, they wait out their deadline and answer 409, never a job that does not exist.
  if (claimed) await ctx.idempotency.confirm(queue, r.owner, r.idempotencyKey as string, r.jobId).catch((err: Error) => ctx.log.warn({ err }, 'job-progress: cannot confirm an idempotency key'))
  await ctx.onCreated?.(queue, r.kind, r.jobId, r.owner).catch((err: Error) => ctx.log.warn({ err }, 'job-progress: cannot add the job to its owner\'s list'))
  return { jobId: r.jobId, created: true }
}
