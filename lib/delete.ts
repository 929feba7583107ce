import type { Redis } from 'ioredis'
import { createHash } from 'node:crypto'
import type { Keys } from './keys'
import { outputsKey } from './outputs'

/**
 * Deletes a job in one script, like the cancel (`cancel.ts`), so a delete and the job's own end
 * cannot interleave: the job leaves every list of its queue, its hash, lock, logs and cancel mark
 * go, its outputs record and upload marker are taken (their storage keys returned, for the
 * caller to remove the files), a `deleted` mark tells a still running worker to stop, and
 * `removed` is XADDed to the queue's event stream: the bridge relays it, and every watcher's hub
 * finds the job gone and sends it its final message ("job was removed").
 *
 * Returns false when there was nothing to delete; else the storage keys to remove.
 */
const SCRIPT = `
local rcall = redis.call
local jobId = ARGV[1]
local jobKey = KEYS[1]
if rcall("EXISTS", jobKey) == 0 and rcall("EXISTS", KEYS[13]) == 0 then return false end
local prev = "waiting"
if rcall("LREM", KEYS[4], 0, jobId) > 0 then prev = "active"
elseif rcall("ZREM", KEYS[8], jobId) > 0 then prev = "completed"
elseif rcall("ZREM", KEYS[9], jobId) > 0 then prev = "failed"
elseif rcall("ZREM", KEYS[6], jobId) > 0 then prev = "delayed"
elseif rcall("ZREM", KEYS[5], jobId) > 0 then prev = "prioritized"
elseif rcall("ZREM", KEYS[7], jobId) > 0 then prev = "waiting-children"
elseif rcall("LREM", KEYS[3], 0, jobId) > 0 then prev = "paused"
else rcall("LREM", KEYS[2], 0, jobId) end
rcall("SREM", KEYS[10], jobId)
rcall("DEL", jobKey, jobKey .. ":lock", jobKey .. ":logs", jobKey .. ":dependencies",
  jobKey .. ":processed", jobKey .. ":failed", jobKey .. ":unsuccessful", KEYS[13])
local files = rcall("HVALS", KEYS[14])
local upload = rcall("GET", KEYS[15])
if upload then table.insert(files, cjson.encode({ key = upload })) end
rcall("DEL", KEYS[14], KEYS[15])
rcall("SET", KEYS[16], "1", "EX", ARGV[2])
local maxEvents = rcall("HGET", KEYS[12], "opts.maxLenEvents") or 10000
rcall("XADD", KEYS[11], "MAXLEN", "~", maxEvents, "*", "event", "removed", "jobId", jobId, "prev", prev)
return files
`
const SHA = createHash('sha1').update(SCRIPT).digest('hex')

/** The mark a deleted job leaves for `markTtlSeconds`, so its worker stops at its next report. */
export function deletedKey (keys: Keys, queue: string, jobId: string): string {
  return keys.queueKey(queue, `jp:deleted:${jobId}`)
}

/** The upload marker, as `cleanup.ts` names it. */
function uploadMarker (keys: Keys, queue: string, jobId: string): string {
  return keys.queueKey(queue, 'jp:upload:' + jobId)
}

/** Runs the delete script; resolves with the storage keys of the job's files, or null when it was gone. */
export async function deleteJob (redis: Redis, keys: Keys, queue: string, jobId: string, markTtlSeconds: number): Promise<string[] | null> {
  const q = (name: string): string => keys.queueKey(queue, name)
  const keyList = [
    keys.job(queue, jobId), q('wait'), q('paused'), q('active'), q('prioritized'), q('delayed'),
    q('waiting-children'), q('completed'), q('failed'), q('stalled'), q('events'), q('meta'),
    keys.cancel(queue, jobId), outputsKey(keys, queue, jobId), uploadMarker(keys, queue, jobId), deletedKey(keys, queue, jobId)
  ]
  const args = [jobId, String(markTtlSeconds)]
  let reply: string[] | null
  try {
    reply = await redis.evalsha(SHA, keyList.length, ...keyList, ...args) as string[] | null
  } catch (err) {
    if (!String((err as Error).message).includes('NOSCRIPT')) throw err
    reply = await redis.eval(SCRIPT, keyList.length, ...keyList, ...args) as string[] | null
  }
  if (reply === null) return null
  return reply.map(v => (JSON.parse(v) as { key: string }).key)
}
