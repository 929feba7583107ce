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
  /**
   * Bytes of one stream's chunks (as JSON) waiting in the writer's process to be stored: past it
   * `write()` throws `StreamBackpressureError` and `pipe()` waits for room. @default 1 MiB
   */
  maxQueuedBytes: number
}

/** Every default of {@link StreamLimits}, spelled once. */
export const STREAM_LIMITS: StreamLimits = {
  maxBytes: 64 * 1024 * 1024,
  maxChunks: 100_000,
  maxChunkBytes: 256 * 1024,
  retentionSeconds: 86_400,
  maxQueuedBytes: 1024 * 1024
}

/**
 * Appends the chunks ARGV[7..] in order unless the job is gone (-1) or the stream has ended (-2);
 * stops before the first chunk that would pass the chunk (-3) or byte (-4) limit, the ones before
 * it stored. Refreshes both keys' expiry and publishes each stored chunk with its offset when the
 * topology lets the script publish (ARGV[4] the channel, the message `head offset mid chunk }`).
 * Returns { first offset, chunks stored, 0 or the code of what stopped it }. One call whatever the
 * number of chunks: 7 Redis calls, plus a PUBLISH per chunk.
 */
const APPEND = `
if redis.call('EXISTS', KEYS[1]) == 0 then return { 0, 0, -1 } end
local meta = redis.call('HMGET', KEYS[3], 'end', 'bytes')
if meta[1] then return { 0, 0, -2 } end
local len = redis.call('LLEN', KEYS[2])
local bytes = tonumber(meta[2] or '0')
local maxChunks, maxBytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local n, code = 0, 0
for i = 7, #ARGV do
  if len + n + 1 > maxChunks then code = -3 break end
  local b = bytes + string.len(ARGV[i])
  if b > maxBytes then code = -4 break end
  bytes = b
  n = n + 1
end
if n > 0 then
  redis.call('RPUSH', KEYS[2], unpack(ARGV, 7, 6 + n))
  redis.call('HSET', KEYS[3], 'bytes', bytes)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  if ARGV[4] ~= '' then
    for i = 1, n do redis.call('PUBLISH', ARGV[4], ARGV[5] .. (len + i - 1) .. ARGV[6] .. ARGV[6 + i] .. '}') end
  end
end
return { len, n, code }
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

/** Chunks one append call carries at most (Lua's `unpack` has a stack limit of a few thousand). */
export const APPEND_BATCH = 1000

/** What an append stored: chunks `first`..`first + stored - 1`, and 0 or the {@link APPENDED} code that stopped it. */
export interface Appended { first: number, stored: number, code: 0 | typeof APPENDED[keyof typeof APPENDED] }

interface StreamScripts {
  jpStreamAppend: (...args: Array<string | number>) => Promise<[number, number, number]>
  jpStreamEnd: (...args: Array<string | number>) => Promise<number>
  jpStreamRead: (...args: Array<string | number>) => Promise<[number, string[], string, string, string]>
}

/** Teaches a connection the stream scripts once: run by digest (EVALSHA), not sent whole per chunk. */
function scripts (redis: Redis): StreamScripts {
  const r = redis as Redis & Partial<StreamScripts>
  if (typeof r.jpStreamAppend !== 'function') {
    redis.defineCommand('jpStreamAppend', { numberOfKeys: 3, lua: APPEND })
    redis.defineCommand('jpStreamEnd', { numberOfKeys: 2, lua: END })
    redis.defineCommand('jpStreamRead', { numberOfKeys: 2, lua: READ })
  }
  return r as Redis & StreamScripts
}

/**
 * Appends chunks (already JSON, at most {@link APPEND_BATCH}) in order in one script call and
 * relays each with its offset on the job's channel: in the same script when the topology allows
 * (published only once stored, so a watcher that reads after the message finds the chunk), else
 * right after, as a Cluster's channel slot differs from the job's.
 */
export async function appendChunks (redis: Redis, keys: Keys, queue: string, jobId: string, name: string, jsons: string[], limits: StreamLimits, live: ScriptRelay | null): Promise<Appended> {
  const k = keys.stream(queue, jobId, name)
  const channel = keys.channel(queue, jobId)
  // The relay message is `head offset mid chunk }`: the script splices in the offset and the chunk.
  const [head, tail] = streamMessageParts(name, '')
  const mid = tail.slice(0, -1)
  const [first, stored, code] = (await scripts(redis).jpStreamAppend(keys.job(queue, jobId), k.chunks, k.meta,
    limits.maxChunks, limits.maxBytes, limits.retentionSeconds, live?.inScript === true ? channel : '', head, mid, ...jsons)).map(Number)
  if (live !== null && !live.inScript && stored > 0) {
    // Sent in one go, in order, on one connection (one node: the channel's).
    await Promise.all(jsons.slice(0, stored).map(async (json, i) => { await live.after(redis, channel, `${head}${first + i}${mid}${json}}`) }))
  }
  return { first, stored, code: code as Appended['code'] }
}

/** Ends a stream (`done`, or `limit` with the message naming it) and tells its watchers; false when it had ended already. */
export async function endStream (redis: Redis, keys: Keys, queue: string, jobId: string, name: string, reason: StreamEndReason, message: string, retentionSeconds: number, live: ScriptRelay | null): Promise<boolean> {
  const k = keys.stream(queue, jobId, name)
  const channel = keys.channel(queue, jobId)
  const [head, tail] = streamEndParts(name, reason, message === '' ? undefined : message)
  const count = Number(await scripts(redis).jpStreamEnd(k.chunks, k.meta, reason, message, retentionSeconds, live?.inScript === true ? channel : '', head, tail))
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
  const [total, raw, reason, at, message] = await scripts(redis).jpStreamRead(k.chunks, k.meta, from, limit)
  const end = reason === 'done' || reason === 'limit' ? { reason: reason as StreamEndReason, offset: Number(at), ...(message !== '' ? { message } : {}) } : null
  return { from: Math.min(from, total), total, chunks: raw.map(c => JSON.parse(c) as unknown), end }
}
