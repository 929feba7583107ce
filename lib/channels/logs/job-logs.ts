import type { Redis } from 'ioredis'
import type { ScriptRelay } from '../../broker/broker'
import type { Keys } from '../../core/keys'
import { logMessageParts } from '../../wire/relay'

/** The job hash field counting every line ever written through {@link appendLog}. */
export const LOGS_WRITTEN_FIELD = 'jpLogs'

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
local offset = redis.call('HINCRBY', KEYS[1], '${LOGS_WRITTEN_FIELD}', 1) - 1
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4] .. offset .. ARGV[5]) end
return offset
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

/** Longest log line, in characters; a longer line is cut and ends with {@link CUT_MARK}. */
export const MAX_LOG_LINE = 8192
export const CUT_MARK = ' [cut]'

/** A line cut to {@link MAX_LOG_LINE} (the mark included); null when it fits. */
export function cutLine (line: string): string | null {
  return line.length <= MAX_LOG_LINE ? null : line.slice(0, MAX_LOG_LINE - CUT_MARK.length) + CUT_MARK
}

/**
 * Appends a line and, with `live`, relays it with its offset on the job's channel, as the
 * broker's topology allows: in the same script when it can (one round trip, published only once
 * the line is stored, so a watcher that reads the list after it got the message finds the line),
 * else right after.
 */
export async function appendLog (redis: Redis, keys: Keys, queue: string, jobId: string, line: string, keepLogs = 0, live: ScriptRelay | null = null): Promise<number> {
  const job = keys.job(queue, jobId)
  const channel = keys.channel(queue, jobId)
  const [head, tail] = logMessageParts(line)
  const offset = Number(await redis.eval(APPEND, 2, job, keys.logs(queue, jobId), line, keepLogs, live?.inScript === true ? channel : '', head, tail))
  if (live !== null && !live.inScript && offset >= 0) await live.after(redis, channel, `${head}${offset}${tail}`)
  return offset
}

/** A page of a job's log: absolute offsets; `truncated` when the lines asked for were trimmed. */
export interface LogsRead {
  /** Offset of the first line returned (at least `first`). */
  from: number
  /** Oldest offset still kept (earlier lines were trimmed by `keepLogs`). */
  first: number
  /** Lines written so far. */
  total: number
  lines: string[]
}

export async function readLogs (redis: Redis, keys: Keys, queue: string, jobId: string, from: number, limit: number): Promise<LogsRead> {
  const job = keys.job(queue, jobId)
  const [first, total, start, lines] = await redis.eval(READ, 2, job, keys.logs(queue, jobId), from, limit) as [number, number, number, string[]]
  return { from: start, first, total, lines }
}
