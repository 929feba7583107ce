import type { FastifyInstance, FastifyRequest } from 'fastify'
import { readStream } from '../../channels/streams/stream-store'
import { QueueUnavailableError } from '../../errors'
import { errors } from '../schemas'
import { loadOwned, type JobRoutesContext } from './job-routes'
import { STREAM_NAME } from '../../wire/streams'

/** Chunks one request may read. */
const MAX_CHUNKS = 1000

/**
 * `GET <basePath>/:jobId/streams/:name?from=&limit=`: a page of a job's named stream, for a
 * catch-up and for polling, behind the same ownership, access policy (`logs`) and watch tokens
 * as the logs route.
 */
export function registerStreamRoutes (fastify: FastifyInstance, ctx: JobRoutesContext, route: { kind: string, queue: string, basePath: string }): void {
  const { kind, queue, basePath } = route
  fastify.get(`${basePath}/:jobId/streams/:name`, {
    schema: {
      summary: `Read chunks a worker wrote to a named stream of a ${kind} job`,
      params: {
        type: 'object',
        properties: { jobId: { type: 'string', format: 'uuid' }, name: { type: 'string', pattern: STREAM_NAME.source } },
        required: ['jobId', 'name']
      },
      querystring: { type: 'object', properties: { from: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: MAX_CHUNKS, default: 100 } } },
      response: {
        200: {
          type: 'object',
          properties: {
            job_id: { type: 'string' },
            name: { type: 'string' },
            count: { type: 'integer', description: 'chunks written so far' },
            chunks: { type: 'array', items: {} },
            from: { type: 'integer' },
            next: { type: 'integer', description: 'ask again with from=next' },
            end: { type: 'object', properties: { reason: { type: 'string', enum: ['done', 'limit'] }, offset: { type: 'integer' }, message: { type: 'string' } }, required: ['reason', 'offset'] }
          },
          required: ['job_id', 'name', 'count', 'chunks', 'from', 'next']
        },
        ...errors(400, 401, 404, 503)
      }
    }
  }, async (request: FastifyRequest<{ Params: { jobId: string, name: string }, Querystring: { from: number, limit: number } }>) => {
    const { jobId, name } = request.params
    await loadOwned(ctx, kind, queue, jobId, request, 'logs')
    const page = await readStream(ctx.redis, ctx.keys, queue, jobId, name, request.query.from, request.query.limit).catch((err: unknown): never => {
      request.log.warn({ err }, 'job-progress: reading a stream failed')
      throw new QueueUnavailableError()
    })
    return { job_id: jobId, name, count: page.total, chunks: page.chunks, from: page.from, next: page.from + page.chunks.length, ...(page.end !== null ? { end: page.end } : {}) }
  })
}
