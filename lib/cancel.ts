import type { Redis } from 'ioredis'
import { createHash } from 'node:crypto'
import type { Keys } from './keys'

/**
 * Cancels a job in one script, decided against its state in Redis, so a cancel and the job's
 * own end cannot both win.
 *
 * When the job is still waiting, paused, delayed, prioritized, waiting for children or active,
 * the script takes it out of that list, deletes its hash and its lock (BullMQ's
 * `moveToFinished` then fails for the worker still running it: "Missing key" / "Missing lock",
 * and its progress updates find no job), sets the cancel mark (which holds the owner, so the job
 * stays answerable) and XADDs `cancelled` to the queue's event stream, trimmed like BullMQ trims
 * it; the bridge relays it like any other event. Otherwise it changes nothing and says which
 * end the job already reached.
 *
 * Every key is named through {@link Keys}; the job's own sub-keys (`:lock`, `:logs` ...) are
 * derived from its key inside the script, as BullMQ's own scripts do.
 */
const SCRIPT = `
local rcall = redis.call
local jobId = ARGV[1]
local jobKey = KEYS[1]
if rcall("ZSCORE", KEYS[8], jobId) then return "completed" end
if rcall("ZSCORE", KEYS[9], jobId) then return "failed" end
if rcall("EXISTS", KEYS[13]) == 1 then return "cancelled" end
if rcall("EXISTS", jobKey) == 0 then return "gone" end
local ended = rcall("HMGET", jobKey, "finishedOn", "failedReason")
if ended[1] then
  if ended[2] then return "failed" end
  return "completed"
end
local prev = "waiting"
if rcall("LREM", KEYS[4], 0, jobId) > 0 then prev = "active"
elseif rcall("ZREM", KEYS[6], jobId) > 0 then prev = "delayed"
elseif rcall("ZREM", KEYS[5], jobId) > 0 then prev = "prioritized"
elseif rcall("ZREM", KEYS[7], jobId) > 0 then prev = "waiting-children"
elseif rcall("LREM", KEYS[3], 0, jobId) > 0 then prev = "paused"
else rcall("LREM", KEYS[2], 0, jobId) end
rcall("SREM", KEYS[10], jobId)
rcall("DEL", jobKey, jobKey .. ":lock", jobKey .. ":logs", jobKey .. ":dependencies",
  jobKey .. ":processed", jobKey .. ":failed", jobKey .. ":unsuccessful")
rcall("SET", KEYS[13], ARGV[2], "EX", ARGV[3])
local maxEvents = rcall("HGET", KEYS[12], "opts.maxLenEvents") or 10000
rcall("XADD", KEYS[11], "MAXLEN", "~", maxEvents, "*", "event", "cancelled", "jobId", jobId, "prev", prev)
return "cancelled:" .. prev
`
const SHA = createHash('sha1').update(SCRIPT).digest('hex')

/**
 * What a cancel found: `cancelled` with the state it interrupted when it won; otherwise the end
 * the job had already reached (`gone`: finished and already removed by `removeOnComplete`).
 */
export type CancelOutcome =
  | { won: true, prev: string }
  | { won: false, state: 'completed' | 'failed' | 'cancelled' | 'gone' }

/** Runs the cancel script for one job; `owner` is kept in the mark for `cancelTtlSeconds`. */
export async function cancelJob (redis: Redis, keys: Keys, queue: string, jobId: string, owner: string, ttlSeconds: number): Promise<CancelOutcome> {
  const q = (name: string): string => keys.queueKey(queue, name)
  const keyList = [
    keys.job(queue, jobId), q('wait'), q('paused'), q('active'), q('prioritized'), q('delayed'),
    q('waiting-children'), q('completed'), q('failed'), q('stalled'), q('events'), q('meta'),
    keys.cancel(queue, jobId)
  ]
  const args = [jobId, owner, String(ttlSeconds)]
  let reply: string
  try {
    reply = await redis.evalsha(SHA, keyList.length, ...keyList, ...args) as string
  } catch (err) {
    if (!String((err as Error).message).includes('NOSCRIPT')) throw err
    reply = await redis.eval(SCRIPT, keyList.length, ...keyList, ...args) as string
  }
  if (reply.startsWith('cancelled:')) return { won: true, prev: reply.slice('cancelled:'.length) }
  return { won: false, state: reply as 'completed' | 'failed' | 'cancelled' | 'gone' }
}
