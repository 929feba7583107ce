import type { Redis } from 'ioredis'
import { deleteJobLua, eventLua, JobScript, jobScriptKeys, takeOutLua } from './job-script'
import type { Keys } from '../../core/keys'

/**
 * Deletes a job in one script, like the cancel (`http/jobs/cancel.ts`), so a delete and the job's own end
 * cannot interleave: the job leaves every list of its queue, its hash, lock, logs and cancel mark
 * go, its outputs record and upload marker are taken (their storage keys returned, for the
 * caller to remove the files), a `deleted` mark tells a still running worker to stop, and
 * `removed` is XADDed to the queue's event stream: the bridge relays it, and every watcher's hub
 * finds the job gone and sends it its final message ("job was removed").
 *
 * Returns false when there was nothing to delete; else the storage keys to remove.
 */
const SCRIPT = new JobScript(`
if rcall("EXISTS", jobKey) == 0 and rcall("EXISTS", KEYS[13]) == 0 then return false end
${takeOutLua(true)}
${deleteJobLua('KEYS[13], KEYS[13] .. ":attempt"')}
local files = rcall("HVALS", KEYS[14])
local upload = rcall("GET", KEYS[15])
if upload then table.insert(files, cjson.encode({ key = upload })) end
rcall("DEL", KEYS[14], KEYS[15])
rcall("SET", KEYS[16], "1", "EX", ARGV[2])
${eventLua('removed')}
return files
`)

/** Runs the delete script; resolves with the storage keys of the job's files, or null when it was gone. */
export async function deleteJob (redis: Redis, keys: Keys, queue: string, jobId: string, markTtlSeconds: number): Promise<string[] | null> {
  const keyList = [...jobScriptKeys(keys, queue, jobId), keys.outputs(queue, jobId), keys.upload(queue, jobId), keys.deleted(queue, jobId)]
  const reply = await SCRIPT.run(redis, keyList, [jobId, String(markTtlSeconds)]) as string[] | null
  if (reply === null) return null
  return reply.map(v => (JSON.parse(v) as { key: string }).key)
}
