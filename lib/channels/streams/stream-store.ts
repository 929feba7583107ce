import type { Redis } from 'ioredis'
import type { ScriptRelay } from '../../broker/broker'
import type { Keys } from '../../core/keys'
import { streamEndParts, streamMessageParts, type StreamEndReason } from '../../wire/streams'

/** What a stream may hold; the writer applies them (a worker's options). */
export interface StreamLimits {
  /** Bytes of chunks (as JSON) one stream holds; past it the stream ends with `limit`. @default 64 MiB */
  maxBytes: number
  /** Chunks one stream holds; past it the stream ends with `limit`. @default 100_000 */
  maxChunks: number
  /** Bytes of one chunk as JSON; a larger one is refused (the stream goes on). @default 256 KiB */
  maxChunkBytes: number
  /** A stream's keys expire this long after its last write. @default 86_400 (a day) */
  retentionSeconds: number
}

/** Every default of {@link StreamLimits}, spelled once. */
export const STREAM_LIMITS: StreamLimits = {
  maxBytes: 64 * 1024 * 1024,
  maxChunks: 100_000,
  maxChunkBytes: 256 * 1024,
  retentionSeconds: 86_400
}

/**
 * Appends a chunk unless the job is gone (-1), the stream has ended (-2) or it would pass the
 * chunk (-3) or byte (-4) limit; refreshes both keys' expiry and publishes the chunk with its
 * offset when the topology lets the script publish. Returns the offset.
 */
const APPEND = `
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[3], 'end') == 1 then return -2 end
local len = redis.call('LLEN', KEYS[2])
if len + 1 > tonumber(ARGV[2]) then return -3 end
local bytes = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0') + string.len(ARGV[1])
if bytes > tonumber(ARGV[3]) then return -4 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'bytes', bytes)
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[6] .. len .. ARGV[7]) end
return len
`

/** Marks the stream ended (once: a second end keeps the first) and returns its chunk count. */
const END = `
if redis.call('HEXISTS', KEYS[2], 'end') == 1 then return -1 end
local len = redis.call('LLEN', KEYS[1])
redis.call('HSET', KEYS[2], 'end', ARGV[1], 'at', len, 'm', ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5] .. len .. ARGV[6]) end
return len
`

/** Chunks from ARGV[1], at most ARGV[2], with the count and the end, in one read. */
const READ = `
local len = redis.call('LLEN', KEYS[1])
local from = tonumber(ARGV[1])
local chunks = {}
if from < len then chunks = redis.call('LRANGE', KEYS[1], from, from + tonumber(ARGV[2]) - 1) end
local meta = redis.call('HMGET', KEYS[2], 'end', 'at', 'm')
return { len, chunks, meta[1] or '', meta[2] or '', meta[3] or '' }
`

export const APPENDED = { gone: -1, ended: -2, chunks: -3, bytes: -4 } as const

/**
 * Appends a chunk (already JSON) and relays it with its offset on the job's channel: in the same
 * script when the topology allows (published only once stored, so a watcher that reads after the
 * message finds the chunk), else right after, as a Cluster's channel slot differs from the job's.
 */
export async function appendChunk (redis: Redis, keys: Keys, queue: string, jobId: string, name: string, json: string, limits: StreamLimits, live: ScriptRelay | null): Promise<number> {
  const k = keys.stream(queue, jobId, name)
  const channel = keys.channel(queue, jobId)
  const [head, tail] = streamMessageParts(name, json)
  const offset = Number(await redis.eval(APPEND, 3, keys.job(queue, jobId), k.chunks, k.meta, json, limits.maxChunks, limits.maxBytes, limits.retentionSeconds, live?.inScript === true ? channel : '', head, tail))
  if (live !== null && !live.inScript && offset >= 0) await live.after(redis, channel, `${head}${offset}${tail}`)
  return offset
}

/** Ends a stream (`done`, or `limit` with the message naming it) and tells its watchers; false when it had ended already. */
export async function endStream (redis: Redis, keys: Keys, queue: string, jobId: string, name: string, reason: StreamEndReason, message: string, retentionSeconds: number, live: ScriptRelay | null): Promise<boolean> {
  const k = keys.stream(queue, jobId, name)
  const channel = keys.channel(queue, jobId)
  const [head, tail] = streamEndParts(name, reason, message === '' ? undefined : message)
  const count = Number(await redis.eval(END, 2, k.chunks, k.meta, reason, message, retentionSeconds, live?.inScript === true ? channel : '', head, tail))
  if (count < 0) return false
  if (live !== null && !live.inScript) await live.after(redis, channel, `${head}${count}${tail}`)
  return true
}

/** A page of a stream: chunks from `from`, the count so far, and how it ended once it has. */
export interface StreamRead {
  from: number
  total: number
  chunks: unknown[]
  end: { reason: StreamEndReason, offset: number, message?: string } | null
}

export async function readStream (redis: Redis, keys: Keys, queue: string, jobId: string, name: string, from: number, limit: number): Promise<StreamRead> {
  const k = keys.stream(queue, jobId, name)
  const [total, raw, reason, at, message] = await redis.eval(READ, 2, k.chunks, k.meta, from, limit) as [number, string[], string, string, string]
  const end = reason === 'done' || reason === 'limit' ? { reason: reason as StreamEndReason, offset: Number(at), ...(message !== '' ? { message } : {}) } : null
  return { from: Math.min(from, total), total, chunks: raw.map(c => JSON.parse(c) as unknown), end }
}
