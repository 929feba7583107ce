import { readLogs } from '../../channels/logs/job-logs'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Queue } from 'bullmq'
import { deleteJob } from './delete'
import { JobNotFoundError, QueueUnavailableError } from '../../errors'
import { errors } from '../schemas'
import { isOutputName, listOutputs, sendOutput } from '../../core/outputs'
import { loadOwned, type JobRoutesContext } from './job-routes'
import type { Storage } from '../../core/storage'

interface KindRoute {
  kind: string
  queue: Queue
  basePath: string
  /** Where uploads are removed through (so their markers go with them). */
  uploads: Storage
}

const JobParams = {
  type: 'object',
  properties: { jobId: { type: 'string', format: 'uuid' } },
  required: ['jobId']
} as const

/** Log lines one request may read. */
const MAX_LOG_LINES = 1000

/**
 * `DELETE :jobId`, `GET :jobId/outputs/:name` and `GET :jobId/logs` of one kind, each behind
 * the access policy (`delete`, `output`, `logs`), answered 404 alike for a missing job and a
 * refused one.
 */
export function registerManageRoutes (fastify: FastifyInstance, ctx: JobRoutesContext, route: KindRoute): void {
  const { kind, queue, basePath } = route
  const unavailable = (request: FastifyRequest, what: string) => (err: unknown): never => {
    request.log.warn({ err }, `job-progress: ${what} failed`)
    throw new QueueUnavailableError()
  }

  fastify.delete(`${basePath}/:jobId`, {
    schema: {
      summary: `Delete a ${kind} job, its upload and its outputs`,
      params: JobParams,
      response: { 200: { type: 'object', properties: { job_id: { type: 'string' }, status: { type: 'string', enum: ['deleted'] } }, required: ['job_id', 'status'] }, ...errors(401, 404, 503) }
    }
  }, async (request: FastifyRequest<{ Params: { jobId: string } }>) => {
    const jobId = request.params.jobId
    await loadOwned(ctx, kind, queue.name, jobId, request, 'delete')
    const files = await deleteJob(ctx.redis, ctx.keys, queue.name, jobId, ctx.cancelTtlSeconds).catch(unavailable(request, 'delete'))
    if (files === null) throw new JobNotFoundError()
    // The job is gone from Redis first: a crash here leaves files without a marker, which the
    // orphan sweep removes.
    await Promise.all(files.map(async key => await route.uploads.remove(key).catch((err: unknown) => {
      request.log.warn({ err, key }, 'job-progress: cannot remove a deleted job\'s file')
    })))
    return { job_id: jobId, status: 'deleted' }
  })

  fastify.get(`${basePath}/:jobId/outputs/:name`, {
    schema: {
      summary: `Download an output file of a ${kind} job (Range supported)`,
      params: { type: 'object', properties: { jobId: { type: 'string', format: 'uuid' }, name: { type: 'string' } }, required: ['jobId', 'name'] },
      headers: { type: 'object', properties: { range: { type: 'string' } } },
      response: {
        200: { description: 'the whole file', type: 'string', format: 'binary' },
        206: { description: 'the requested byte range', type: 'string', format: 'binary' },
        ...errors(401, 404, 416, 503)
      }
    }
  }, async (request: FastifyRequest<{ Params: { jobId: string, name: string } }>, reply) => {
    const { jobId, name } = request.params
    await loadOwned(ctx, kind, queue.name, jobId, request, 'output')
    const outputs = isOutputName(name) ? await listOutputs(ctx.redis, ctx.keys, queue.name, jobId).catch(unavailable(request, 'reading outputs')) : []
    return await sendOutput(reply, ctx.storage, outputs.find(o => o.name === name), request.headers.range)
  })

  fastify.get(`${basePath}/:jobId/logs`, {
    schema: {
      summary: `Read the log lines a worker added to a ${kind} job`,
      params: JobParams,
      querystring: { type: 'object', properties: { start: { type: 'integer', minimum: 0, default: 0 }, from: { type: 'integer', minimum: 0 }, limit: { type: 'integer', minimum: 1, maximum: MAX_LOG_LINES, default: 100 } } },
      response: { 200: { type: 'object', properties: { job_id: { type: 'string' }, count: { type: 'integer' }, logs: { type: 'array', items: { type: 'string' } }, from: { type: 'integer' }, next: { type: 'integer' }, first: { type: 'integer' }, truncated: { type: 'boolean' } }, required: ['job_id', 'count', 'logs'] }, ...errors(400, 401, 404, 503) }
    }
  }, async (request: FastifyRequest<{ Params: { jobId: string }, Querystring: { start: number, from?: number, limit: number } }>) => {
    const { jobId } = request.params
    await loadOwned(ctx, kind, queue.name, jobId, request, 'logs')
    // Absolute offsets (lib/channels/logs/job-logs.ts): `from` (or `start`) names a line for good, whatever
    // keepLogs trimmed; `next` is where to ask again; `truncated` when lines asked for are gone.
    const asked = request.query.from ?? request.query.start
    const page = await readLogs(ctx.redis, ctx.keys, queue.name, jobId, asked, request.query.limit).catch(unavailable(request, 'reading logs'))
    return { job_id: jobId, count: page.total, logs: page.lines, from: page.from, next: page.from + page.lines.length, first: page.first, ...(asked < page.from ? { truncated: true } : {}) }
  })
}
