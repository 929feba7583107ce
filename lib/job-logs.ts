import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Redis } from 'ioredis'
import { QueueUnavailableError } from './errors'
import type { Keys } from './keys'
import { loadOwned, type JobRoutesContext } from './routes'

/** The job hash field counting every line ever written through {@link appendLog}. */
export const LOGS_WRITTEN_FIELD = 'jpLogs'
/** Most lines one request returns. */
export const MAX_LOG_LINES = 1000

/**
 * Appends a line as BullMQ's `job.log()` does (RPUSH, trimmed to `keepLogs`), and counts it in
 * the job hash, in one script: the count makes offsets absolute, so trimming never shifts them.
 * Nothing is written for a job that no longer exists. Returns the line's offset, or -1.
 */
const APPEND = `
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('RPUSH', KEYS[2], ARGV[1])
local keep = tonumber(ARGV[2])
if keep > 0 then redis.call('LTRIM', KEYS[2], -keep, -1) end
return redis.call('HINCRBY', KEYS[1], '${LOGS_WRITTEN_FIELD}', 1) - 1
`

/**
 * Reads lines from absolute offset ARGV[1], at most ARGV[2], atomically with the counts. Lines
 * written with a plain `job.log()` are not counted: then the count is the list's length, which is
 * right until `keepLogs` trims (documented).
 */
const READ = `
local len = redis.call('LLEN', KEYS[2])
local written = tonumber(redis.call('HGET', KEYS[1], '${LOGS_WRITTEN_FIELD}') or '0')
if written < len then written = len end
local first = written - len
local from = tonumber(ARGV[1])
if from < first then from = first end
local lines = {}
if from < written then lines = redis.call('LRANGE', KEYS[2], from - first, from - first + tonumber(ARGV[2]) - 1) end
return { first, written, from, lines }
`

export async function appendLog (redis: Redis, keys: Keys, queue: string, jobId: string, line: string, keepLogs = 0): Promise<number> {
  const job = keys.job(queue, jobId)
  return Number(await redis.eval(APPEND, 2, job, `${job}:logs`, line, keepLogs))
}

export interface LogsPage {
  job_id: string
  /** Offset of the first line returned (at least `first`). */
  from: number
  /** Offset to ask for next. */
  next: number
  /** Oldest offset still kept (earlier lines were trimmed by `keepLogs`). */
  first: number
  /** Lines written so far. */
  total: number
  /** Present when the lines asked for were trimmed: they are lost, reading resumes at `from`. */
  truncated?: true
  lines: string[]
}

/** `GET <basePath>/:jobId/logs?from=<offset>&limit=<n>`: a job's log lines with absolute offsets. */
export function registerLogsRoute (fastify: FastifyInstance, ctx: JobRoutesContext, route: { kind: string, queue: string, basePath: string }): void {
  fastify.get(`${route.basePath}/:jobId/logs`, {
    schema: {
      params: { type: 'object', properties: { jobId: { type: 'string' } }, required: ['jobId'] },
      querystring: { type: 'object', properties: { from: { type: 'integer', minimum: 0, default: 0 }, limit: { type: 'integer', minimum: 1, maximum: MAX_LOG_LINES, default: 100 } }, additionalProperties: true }
    }
  }, async (request: FastifyRequest<{ Params: { jobId: string }, Querystring: { from: number, limit: number } }>): Promise<LogsPage> => {
    const { jobId } = request.params
    await loadOwned(ctx, route.kind, route.queue, jobId, request, true)
    const job = ctx.keys.job(route.queue, jobId)
    let reply: [number, number, number, string[]]
    try {
      reply = await ctx.redis.eval(READ, 2, job, `${job}:logs`, request.query.from, request.query.limit) as typeof reply
    } catch (err) {
      request.log.warn({ err }, 'job-progress: cannot read the job\'s logs')
      throw new QueueUnavailableError()
    }
    const [first, total, from, lines] = reply
    return { job_id: jobId, from, next: from + lines.length, first, total, ...(request.query.from < from ? { truncated: true as const } : {}), lines }
  })
}
