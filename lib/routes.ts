import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Queue } from 'bullmq'
import type { Redis } from 'ioredis'
import { JobFinishedError, JobNotCompleteError, JobNotFoundError, QueueUnavailableError, UnauthorizedError } from './errors'
import { isFinal } from './events'
import { isJobId, type Keys } from './keys'
import type { Owners } from './owner'
import { progressMessage } from './protocols/progress'
import { readSnapshots, type Snapshot } from './snapshot'
import type { Storage } from './storage'
import type { UploadJobData } from './uploads'

export interface JobRoutesContext {
  redis: Redis
  keys: Keys
  owners: Owners
  storage: Storage
  cancelTtlSeconds: number
}

interface KindRoute {
  kind: string
  queue: Queue
  basePath: string
}

const JobParams = {
  type: 'object',
  properties: { jobId: { type: 'string' } },
  required: ['jobId']
} as const

/**
 * Reads a job for a request and checks the request owns it. A missing job and somebody else's
 * answer the same 404, so job ids leak nothing.
 */
export async function loadOwned (ctx: JobRoutesContext, kind: string, queue: string, jobId: string, request: FastifyRequest): Promise<Snapshot> {
  const identity = await ctx.owners.fromRequest(request)
  if (identity === null) throw new UnauthorizedError('no session or API key')
  if (!isJobId(jobId)) throw new JobNotFoundError()
  let snapshot: Snapshot | null
  try {
    [snapshot] = await readSnapshots(ctx.redis, ctx.keys, [{ kind, queue, jobId }], true)
  } catch (err) {
    request.log.warn({ err }, 'job-progress: cannot read the job')
    throw new QueueUnavailableError()
  }
  if (snapshot === null || snapshot.owner !== identity.owner) throw new JobNotFoundError()
  return snapshot
}

/** `GET :jobId/status`, `GET :jobId/result`, `POST :jobId/cancel` of one kind. */
export function registerJobRoutes (fastify: FastifyInstance, ctx: JobRoutesContext, route: KindRoute): void {
  const { kind, queue, basePath } = route
  const schema = { params: JobParams }
  type Req = FastifyRequest<{ Params: { jobId: string } }>

  fastify.get(`${basePath}/:jobId/status`, { schema }, async (request: Req) => {
    const snapshot = await loadOwned(ctx, kind, queue.name, request.params.jobId, request)
    return progressMessage(snapshot.event)
  })

  fastify.get(`${basePath}/:jobId/result`, { schema }, async (request: Req) => {
    const { event } = await loadOwned(ctx, kind, queue.name, request.params.jobId, request)
    if (event.state !== 'completed') throw new JobNotCompleteError(progressMessage(event).status)
    return { job_id: event.jobId, result: event.result ?? null }
  })

  fastify.post(`${basePath}/:jobId/cancel`, { schema }, async (request: Req, reply) => {
    const jobId = request.params.jobId
    const { event, owner, data } = await loadOwned(ctx, kind, queue.name, jobId, request)
    if (isFinal(event.state)) throw new JobFinishedError(progressMessage(event).status)
    const cancelKey = ctx.keys.cancel(queue.name, jobId)
    try {
      // The mark holds the owner, so the job stays answerable after a queued job is removed.
      await ctx.redis.set(cancelKey, owner ?? '', 'EX', ctx.cancelTtlSeconds)
      // A queued job goes at once; an active one is locked by its worker, which sees the mark at
      // its next progress report and stops.
      const removed = await queue.remove(jobId)
      if (removed === 1) {
        const file = (data as UploadJobData | null)?.file
        if (file !== undefined) await ctx.storage.remove(file.key).catch(() => {})
      } else {
        const [after] = await readSnapshots(ctx.redis, ctx.keys, [{ kind, queue: queue.name, jobId }], false)
        if (after?.event.state === 'completed') {
          // It finished while we were cancelling it: the result stands.
          await ctx.redis.del(cancelKey)
          throw new JobFinishedError('complete')
        }
      }
      await ctx.redis.publish(ctx.keys.channel(queue.name, jobId), JSON.stringify({ e: 'cancelled', t: Date.now() }))
    } catch (err) {
      if (err instanceof JobFinishedError) throw err
      request.log.warn({ err }, 'job-progress: cancel failed')
      throw new QueueUnavailableError()
    }
    return reply.code(202).send({ job_id: jobId, status: 'cancelled' })
  })
}
