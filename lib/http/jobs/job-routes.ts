import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Queue } from 'bullmq'
import type { Redis } from 'ioredis'
import { JobFinishedError, JobNotCompleteError, JobNotFoundError, QueueUnavailableError, UnauthorizedError } from '../../errors'
import { isFinal } from '../../core/event'
import { isJobId, type Keys } from '../../core/keys'
import { EXPIRED, type Owners } from '../auth/identity'
import { detailedProgressMessage, progressMessage } from '../../protocols/progress'
import { readOwned, type Snapshot } from '../../core/snapshot'
import type { Storage } from '../../core/storage'
import { cancelJob, type CancelOutcome } from './cancel'
import { CancelledSchema, errors, ProgressMessageSchema, ResultSchema, WatchTokenSchema } from '../schemas'
import { listOutputs } from '../../core/outputs'
import { allowed, mayRead, ownerOnly, type CanAccess, type JobAction } from '../../core/access'

export interface JobRoutesContext {
  redis: Redis
  keys: Keys
  owners: Owners
  storage: Storage
  cancelTtlSeconds: number
  /** Whether the status route adds the worker's stage, message and data (`progressDetails`). */
  details?: boolean
  /** Who may act on a job besides its owner (`canAccess` option). */
  canAccess: CanAccess
}

/** What a watch token (`?token=`) may do: watch and read, never change. */
const TOKEN_ACTIONS = new Set<JobAction>(['watch', 'status', 'result', 'logs'])

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
 * Reads a job for a request and checks the access policy lets the request take `action` on it.
 * A missing job and one the policy refuses answer the same 404 after the same Redis commands, so
 * job ids leak nothing: the owner is checked inside the read, before anything else of the job is
 * read. Somebody else's job goes to an application's policy with its owner alone, and is read
 * (a second time) only once the policy let the request in.
 */
export async function loadOwned (ctx: JobRoutesContext, kind: string, queue: string, jobId: string, request: FastifyRequest, action: JobAction, tokens = TOKEN_ACTIONS.has(action)): Promise<Snapshot> {
  const identity = await ctx.owners.fromRequest(request, false, tokens)
  if (identity === null) throw new UnauthorizedError(ctx.owners.expiredSession(request) ? EXPIRED : 'no session or API key')
  // A bad watch token, or one for another job, is answered like an unknown job, before any Redis
  // read (it says nothing about the job). A token grants its one job; the policy is for the rest.
  const token = identity.via === 'token'
  if (!isJobId(jobId) || identity.job === null || (token && !mayRead(identity, kind, jobId, identity.owner))) throw new JobNotFoundError()
  const target = { kind, queue, jobId }
  const read = async (owner: string, others: boolean): Promise<Snapshot | string | null> => {
    try {
      return await readOwned(ctx.redis, ctx.keys, target, owner, false, others)
    } catch (err) {
      request.log.warn({ err }, 'job-progress: cannot read the job')
      throw new QueueUnavailableError()
    }
  }
  let snapshot = await read(identity.owner, !token && ctx.canAccess !== ownerOnly)
  if (typeof snapshot === 'string') {
    if (!await allowed(ctx.canAccess, request, { kind, jobId, owner: snapshot, data: null }, action, identity.owner)) throw new JobNotFoundError()
    snapshot = await read(snapshot, false)
  }
  if (snapshot === null || typeof snapshot === 'string' || snapshot.owner === null) throw new JobNotFoundError()
  return snapshot
}

/** How a 409 names the end a job reached before the cancel (`gone`: finished and already removed). */
const ENDED = { completed: 'complete', failed: 'failed', cancelled: 'cancelled', gone: 'finished' } as const

/** `GET :jobId/status`, `GET :jobId/result`, `POST :jobId/cancel` of one kind. */
export function registerJobRoutes (fastify: FastifyInstance, ctx: JobRoutesContext, route: KindRoute): void {
  const { kind, queue, basePath } = route
  const schema = { params: JobParams }
  const doc = (summary: string, ok: Record<number, unknown>, ...codes: number[]): Record<string, unknown> => ({ ...schema, summary, response: { ...ok, ...errors(401, 404, ...codes, 503) } })
  type Req = FastifyRequest<{ Params: { jobId: string } }>

  fastify.get(`${basePath}/:jobId/status`, { schema: doc(`Status of a ${kind} job`, { 200: ProgressMessageSchema }) }, async (request: Req) => {
    const snapshot = await loadOwned(ctx, kind, queue.name, request.params.jobId, request, 'status')
    return ctx.details === true ? detailedProgressMessage(snapshot.event) : progressMessage(snapshot.event)
  })

  fastify.get(`${basePath}/:jobId/result`, { schema: doc(`Result of a completed ${kind} job`, { 200: ResultSchema }, 409) }, async (request: Req) => {
    const { event } = await loadOwned(ctx, kind, queue.name, request.params.jobId, request, 'result')
    if (event.state !== 'completed') throw new JobNotCompleteError(progressMessage(event).status)
    // Output files a worker attached (`putOutput`), listed only when there are some.
    const outputs = await listOutputs(ctx.redis, ctx.keys, queue.name, event.jobId).catch(() => [])
    if (outputs.length === 0) return { job_id: event.jobId, result: event.result ?? null }
    const base = `${request.server.prefix}${basePath}/${event.jobId}/outputs/`
    return { job_id: event.jobId, result: event.result ?? null, outputs: outputs.map(o => ({ name: o.name, size: o.size, type: o.type, url: base + o.name })) }
  })

  fastify.post(`${basePath}/:jobId/cancel`, { schema: doc(`Cancel a ${kind} job`, { 202: CancelledSchema }, 409) }, async (request: Req, reply) => {
    const jobId = request.params.jobId
    const { event, owner } = await loadOwned(ctx, kind, queue.name, jobId, request, 'cancel')
    if (isFinal(event.state)) throw new JobFinishedError(progressMessage(event).status)
    let outcome: CancelOutcome
    try {
      // Decided in one script against the job's state: either the cancel wins and the job can no
      // longer complete, or the job's own end stands. Watchers learn it from the event stream.
      outcome = await cancelJob(ctx.redis, ctx.keys, queue.name, jobId, owner ?? '', ctx.cancelTtlSeconds)
    } catch (err) {
      request.log.warn({ err }, 'job-progress: cancel failed')
      throw new QueueUnavailableError()
    }
    if (!outcome.won) throw new JobFinishedError(ENDED[outcome.state])
    return reply.code(202).send({ job_id: jobId, status: 'cancelled' })
  })

  // A fresh watch token for a job the caller owns (by session, API key or getOwner, never by a
  // token: a token cannot extend itself).
  const tokens = ctx.owners.watchTokens
  if (tokens !== null) {
    fastify.post(`${basePath}/:jobId/watch-token`, { schema: doc(`A token to watch a ${kind} job`, { 200: WatchTokenSchema }) }, async (request: Req) => {
      const jobId = request.params.jobId
      // Whoever may watch the job (its owner, or whom canAccess allows) may hand out a token to
      // watch it; never by a token: a token cannot extend itself.
      const { owner } = await loadOwned(ctx, kind, queue.name, jobId, request, 'watch', false)
      const { token, expiresAt } = tokens.sign({ kind, jobId, owner: owner ?? '' })
      return { job_id: jobId, watch_token: token, expires_at: new Date(expiresAt * 1000).toISOString() }
    })
  }
}
