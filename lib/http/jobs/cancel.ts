import type { Redis } from 'ioredis'
import { deleteJobLua, eventLua, JobScript, jobScriptKeys, takeOutLua } from './job-script'
import type { Keys } from '../../core/keys'

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
 * end the job already reached. Keys and shared steps: `job-script.ts`.
 *
 * The job hash, which said the attempt, is gone: the mark's companion `<mark>:attempt` keeps it
 * as long as the mark, so a snapshot of the cancelled job (a re-read after the relayed
 * `cancelled`, the status route, a watcher that opens later) tells the attempt that was
 * cancelled, not the first.
 *
 * A cancelled job is in no BullMQ set, so the script also records it, with its attempt, in the
 * queue's set of cancels (KEYS[14], scored by Redis's clock, trimmed to the mark's lifetime): a
 * `cancelled` entry trimmed from the stream before the bridge read it is recovered from there
 * (lib/bridge/final-recovery.ts). The entry carries the attempt too, so both paths give the
 * final the same delivery id.
 */
const SCRIPT = new JobScript(`
if rcall("ZSCORE", KEYS[8], jobId) then return "completed" end
if rcall("ZSCORE", KEYS[9], jobId) then return "failed" end
if rcall("EXISTS", KEYS[13]) == 1 then return "cancelled" end
if rcall("EXISTS", jobKey) == 0 then return "gone" end
local ended = rcall("HMGET", jobKey, "finishedOn", "failedReason")
if ended[1] then
  if ended[2] then return "failed" end
  return "completed"
end
${takeOutLua(false)}
local started = rcall("HMGET", jobKey, "ats", "atm")
local attempt = math.max(tonumber(started[1]) or 0, tonumber(started[2]) or 0, 1)
${deleteJobLua()}
rcall("SET", KEYS[13], ARGV[2], "EX", ARGV[3])
rcall("SET", KEYS[13] .. ":attempt", attempt, "EX", ARGV[3])
local time = rcall("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
rcall("ZADD", KEYS[14], now, jobId .. ":" .. attempt)
rcall("ZREMRANGEBYSCORE", KEYS[14], "-inf", now - tonumber(ARGV[3]) * 1000)
${eventLua('cancelled', ', "attempt", attempt')}
return "cancelled:" .. prev
`)

/**
 * What a cancel found: `cancelled` with the state it interrupted when it won; otherwise the end
 * the job had already reached (`gone`: finished and already removed by `removeOnComplete`).
 */
export type CancelOutcome =
  | { won: true, prev: string }
  | { won: false, state: 'completed' | 'failed' | 'cancelled' | 'gone' }

/** Runs the cancel script for one job; `owner` is kept in the mark for `cancelTtlSeconds`. */
export async function cancelJob (redis: Redis, keys: Keys, queue: string, jobId: string, owner: string, ttlSeconds: number): Promise<CancelOutcome> {
  const reply = await SCRIPT.run(redis, [...jobScriptKeys(keys, queue, jobId), keys.cancelled(queue)], [jobId, owner, String(ttlSeconds)]) as string
  if (reply.startsWith('cancelled:')) return { won: true, prev: reply.slice('cancelled:'.length) }
  return { won: false, state: reply as 'completed' | 'failed' | 'cancelled' | 'gone' }
}
