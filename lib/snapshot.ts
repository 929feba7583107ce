import type { Cluster, Redis } from 'ioredis'
import { eta, parseProgress, type JobEvent, type JobState } from './events'
import { progressDetails } from './progress-details'
import { OWNER_FIELD, type Keys } from './keys'
import { formatVersion, NO_ENTRY } from './wire/version'
import { isCluster } from './broker/index'
import { slotOf } from './broker/slot'

/** A job's current state read from Redis, with what the routes need besides the event. */
export interface Snapshot {
  event: JobEvent
  /** Who uploaded it (the owner field, else `data.owner`, else the cancellation mark). */
  owner: string | null
  /** When the current attempt started (ms), for the ETA. */
  startedAt: number | null
  /** The job's data as stored at upload (when read). */
  data: Record<string, unknown> | null
  /** The last entry of the queue's event stream, read atomically with the job. */
  entryId: string
}

export interface SnapshotTarget {
  kind: string
  queue: string
  jobId: string
}

/** A connection the plugin reads with: a standalone client or a cluster. */
export type Commands = Redis | Cluster

/**
 * One script per job, so the job, where it sits and the stream's last entry id are read at one
 * instant: a relayed event is then newer than the snapshot exactly when its entry id is larger.
 * Every read is O(1) (or O(log N) for the stream's tail): ZSCORE on the sorted sets and EXISTS on
 * the lock, never BullMQ's LPOS over the active or waiting lists, whose cost grows with the queue.
 * The owner is read first, alone from its own field; only jobs written before that field existed
 * pay for decoding their data. With an expected owner (ARGV[3] = '1', ARGV[4] = the owner) the
 * script stops right there for a job of somebody else and for one that does not exist, after the
 * same reads as {@link OWNER_SCRIPT}'s, and answers nil for both: nothing of the job leaves Redis.
 */
const SNAPSHOT_SCRIPT = `
local o = redis.call('HMGET', KEYS[1], '${OWNER_FIELD}', 'timestamp')
local cancel = redis.call('GET', KEYS[9])
local owner = o[1]
local data = false
if ARGV[2] == '1' or (not owner and o[2]) then data = redis.call('HGET', KEYS[1], 'data') end
if not owner and data then
  local ok, decoded = pcall(cjson.decode, data)
  if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then owner = decoded.owner end
end
if not owner then owner = cancel end
if ARGV[3] == '1' and (not owner or owner == '' or owner ~= ARGV[4]) then return false end
local h = redis.call('HMGET', KEYS[1], 'progress', 'returnvalue', 'failedReason', 'finishedOn', 'processedOn', 'ats', 'atm')
local where = ''
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then where = 'completed'
elseif redis.call('ZSCORE', KEYS[3], ARGV[1]) then where = 'failed'
elseif redis.call('EXISTS', KEYS[7]) == 1 then where = 'active'
elseif redis.call('ZSCORE', KEYS[4], ARGV[1]) then where = 'delayed'
elseif redis.call('ZSCORE', KEYS[5], ARGV[1]) then where = 'prioritized'
elseif redis.call('ZSCORE', KEYS[6], ARGV[1]) then where = 'waiting-children'
end
local tail = redis.call('XREVRANGE', KEYS[8], '+', '-', 'COUNT', 1)
local last = '0-0'
if tail[1] then last = tail[1][1] end
if ARGV[2] ~= '1' then data = false end
return {h[1], h[2], h[3], h[4], h[5], h[6], h[7], o[2], where, cancel, last, owner, data}
`

/**
 * The owner alone, in one small read, before any other work for a job: a job of somebody else
 * and a job that does not exist then cost the same, so timing tells nothing about job ids.
 */
const OWNER_SCRIPT = `
local h = redis.call('HMGET', KEYS[1], '${OWNER_FIELD}', 'timestamp')
local mark = redis.call('GET', KEYS[2])
if h[1] then return h[1] end
if h[2] then
  local ok, decoded = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'data') or '')
  if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then return decoded.owner end
end
return mark
`

interface Scripted {
  jpSnapshot: (...args: string[]) => Promise<unknown[]>
  jpOwner: (...args: string[]) => Promise<string | null>
}

/** Teaches a connection (or a pipeline made from it) the plugin's two scripts, once. */
export function withScripts (redis: Commands): void {
  const r = redis as Commands & Partial<Scripted>
  if (typeof r.jpSnapshot === 'function') return
  redis.defineCommand('jpSnapshot', { numberOfKeys: 9, lua: SNAPSHOT_SCRIPT })
  redis.defineCommand('jpOwner', { numberOfKeys: 2, lua: OWNER_SCRIPT })
}

function snapshotArgs (keys: Keys, { queue, jobId }: SnapshotTarget, withData: boolean, owner?: string): string[] {
  return [
    keys.job(queue, jobId),
    keys.queueKey(queue, 'completed'),
    keys.queueKey(queue, 'failed'),
    keys.queueKey(queue, 'delayed'),
    keys.queueKey(queue, 'prioritized'),
    keys.queueKey(queue, 'waiting-children'),
    keys.lock(queue, jobId),
    keys.queueKey(queue, 'events'),
    keys.cancel(queue, jobId),
    jobId,
    withData ? '1' : '0',
    owner === undefined ? '0' : '1',
    owner ?? ''
  ]
}

/** The owner of a job, or null when it does not exist: one small script, nothing else. */
export async function readOwner (redis: Commands, keys: Keys, target: SnapshotTarget): Promise<string | null> {
  withScripts(redis)
  const owner = await (redis as unknown as Scripted).jpOwner(keys.job(target.queue, target.jobId), keys.cancel(target.queue, target.jobId))
  return typeof owner === 'string' && owner !== '' ? owner : null
}

/**
 * The owners of many jobs in one pipelined round trip (one small script each), in order: null
 * for a job that does not exist, an Error for a read Redis refused. A storm of subscriptions
 * pays one write and one round trip per batch, not one per job. On a cluster, one pipeline per
 * slot, run side by side.
 */
export async function readOwners (redis: Commands, keys: Keys, targets: SnapshotTarget[]): Promise<Array<string | null | Error>> {
  if (targets.length === 0) return []
  withScripts(redis)
  if (targets.length === 1) return [await readOwner(redis, keys, targets[0])]
  if (isCluster(redis)) {
    const groups = new Map<number, number[]>()
    targets.forEach((target, i) => {
      const slot = slotOf(keys.job(target.queue, target.jobId))
      const group = groups.get(slot)
      if (group === undefined) groups.set(slot, [i])
      else group.push(i)
    })
    if (groups.size > 1) {
      const out: Array<string | null | Error> = new Array(targets.length)
      await Promise.all([...groups.values()].map(async (indexes) => {
        const got = await readOwners(redis, keys, indexes.map(i => targets[i]))
        indexes.forEach((i, j) => { out[i] = got[j] })
      }))
      return out
    }
  }
  const pipe = redis.pipeline() as unknown as Scripted & { exec: () => Promise<Array<[Error | null, unknown]> | null> }
  for (const { queue, jobId } of targets) void pipe.jpOwner(keys.job(queue, jobId), keys.cancel(queue, jobId))
  const replies = await pipe.exec()
  if (replies === null) throw new Error('pipeline was discarded')
  return replies.map(([err, owner]) => err ?? (typeof owner === 'string' && owner !== '' ? owner : null))
}

/**
 * Reads many jobs in one pipelined round trip (one script call each). Null for a job that does
 * not exist. On a cluster, one pipeline per slot, run side by side.
 */
export async function readSnapshots (redis: Commands, keys: Keys, targets: SnapshotTarget[], withData: boolean): Promise<Array<Snapshot | null>> {
  if (targets.length === 0) return []
  withScripts(redis)
  const now = Date.now()
  if (targets.length === 1) {
    const reply = await (redis as unknown as Scripted).jpSnapshot(...snapshotArgs(keys, targets[0], withData))
    return [toSnapshot(targets[0], reply as Reply, withData, now)]
  }
  const replies = await perJob(redis, keys, targets, (pipe, i) => { void pipe.jpSnapshot(...snapshotArgs(keys, targets[i], withData)) })
  return targets.map((target, i) => {
    const value = replies[i]
    if (value instanceof Error) throw value
    return toSnapshot(target, value as Reply, withData, now)
  })
}

/** A job to open for a watcher: read only if `owner` (when given) is its owner. */
export interface OpenRead {
  target: SnapshotTarget
  owner: string | undefined
}

/**
 * The first read of jobs opened for watchers, in one pipelined round trip: one script call each
 * that checks the owner first when one is expected. Null for a job that does not exist and, alike,
 * for a job of somebody else (the script stops after the same reads and answers the same nil); an
 * Error for a read Redis refused. On a cluster, one pipeline per slot, run side by side.
 */
export async function readOpens (redis: Commands, keys: Keys, reads: OpenRead[]): Promise<Array<Snapshot | null | Error>> {
  if (reads.length === 0) return []
  withScripts(redis)
  const now = Date.now()
  let replies: unknown[]
  if (reads.length === 1) {
    try {
      replies = [await (redis as unknown as Scripted).jpSnapshot(...snapshotArgs(keys, reads[0].target, false, reads[0].owner))]
    } catch (err) {
      replies = [err instanceof Error ? err : new Error(String(err))]
    }
  } else {
    replies = await perJob(redis, keys, reads.map(r => r.target), (pipe, i) => { void pipe.jpSnapshot(...snapshotArgs(keys, reads[i].target, false, reads[i].owner)) })
  }
  return reads.map(({ target }, i) => {
    const value = replies[i]
    if (value instanceof Error) return value
    return value === null ? null : toSnapshot(target, value as Reply, false, now)
  })
}

type Pipe = Scripted & { exec: () => Promise<Array<[Error | null, unknown]> | null> }

/**
 * One script call per target, pipelined: each target's reply, or the Error Redis answered for it.
 * A cluster pipeline must stay on one node: one pipeline per slot (per queue, as a queue's keys
 * share a slot), run side by side.
 */
async function perJob (redis: Commands, keys: Keys, targets: SnapshotTarget[], call: (pipe: Pipe, i: number) => void): Promise<unknown[]> {
  if (isCluster(redis)) {
    const groups = new Map<number, number[]>()
    targets.forEach((target, i) => {
      const slot = slotOf(keys.job(target.queue, target.jobId))
      const group = groups.get(slot)
      if (group === undefined) groups.set(slot, [i])
      else group.push(i)
    })
    if (groups.size > 1) {
      const out: unknown[] = new Array(targets.length)
      await Promise.all([...groups.values()].map(async (indexes) => {
        const got = await onePipeline(redis, indexes, call)
        indexes.forEach((i, j) => { out[i] = got[j] })
      }))
      return out
    }
  }
  return await onePipeline(redis, targets.map((_, i) => i), call)
}

async function onePipeline (redis: Commands, indexes: number[], call: (pipe: Pipe, i: number) => void): Promise<unknown[]> {
  const pipe = redis.pipeline() as unknown as Pipe
  for (const i of indexes) call(pipe, i)
  const replies = await pipe.exec()
  if (replies === null) throw new Error('pipeline was discarded')
  return replies.map(([err, value]) => err ?? value)
}

function json (text: string | null): unknown {
  if (text === null || text === '') return null
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

type Reply = Array<string | null>

/** Where BullMQ keeps a job, as the snapshot script found it (`''` = waiting, or no set at all). */
export type Where = 'completed' | 'failed' | 'active' | 'delayed' | 'prioritized' | 'waiting-children' | ''

/** Maps the script's reply to the plugin's state. Pure, so the state table is tested row by row. */
export function toSnapshot (target: SnapshotTarget, reply: Reply, withData: boolean, now: number): Snapshot | null {
  const [progress, returnvalue, failedReason, finishedOn, processedOn, ats, atm, timestamp, rawWhere, cancelOwner, last, owner, rawData] = reply
  const where = (rawWhere ?? '') as Where
  const exists = timestamp !== null || processedOn !== null || finishedOn !== null || where !== ''
  if (!exists && cancelOwner === null) return null

  const started = Number(ats ?? 0)
  const made = Number(atm ?? 0)
  const parsed = parseProgress(json(progress))
  let { processed, total } = parsed
  let state: JobState
  let attempt: number
  if (where === 'completed' || (finishedOn !== null && returnvalue !== null && failedReason === null && where === '')) {
    state = 'completed'
    attempt = Math.max(started, made, 1)
    if (total > 0) processed = total
  } else if (cancelOwner !== null) {
    state = 'cancelled'
    attempt = Math.max(started, made, 1)
  } else if (where === 'failed' || (finishedOn !== null && where === '')) {
    state = 'failed'
    attempt = Math.max(started, made, 1)
  } else if (where === 'active') {
    state = 'active'
    attempt = Math.max(started, 1)
    // The progress a failed attempt left behind is not this attempt's: the retry starts at 0.
    if (parsed.attempt !== undefined && parsed.attempt < attempt) {
      processed = 0
      total = 0
    }
  } else {
    // Waiting, delayed, prioritized, waiting for children, moved back after a stall or a failed
    // attempt, or active with its lock expired and the stall check not yet run: in every case
    // the next attempt is what the watcher waits for.
    state = 'queued'
    attempt = started + 1
    processed = 0
    total = started === 0 ? total : 0
  }
  const startedAt = processedOn === null ? null : Number(processedOn)
  const data = withData ? json(rawData ?? null) as Record<string, unknown> | null : null
  const entryId = last ?? NO_ENTRY
  const event: JobEvent = {
    kind: target.kind,
    jobId: target.jobId,
    state,
    processed,
    total,
    attempt,
    etaSeconds: eta(state, processed, total, startedAt, now),
    ts: now,
    version: formatVersion(attempt, entryId)
  }
  // The worker's stage and message of this attempt (a waiting retry shows none of the failed attempt's).
  if (state !== 'queued') Object.assign(event, progressDetails(json(progress)))
  if (state === 'completed') event.result = json(returnvalue)
  if (state === 'failed') event.error = failedReason ?? 'failed'
  if (state === 'cancelled') event.error = 'cancelled'
  return { event, owner: owner ?? null, startedAt, data, entryId }
}

/** Writes the owner next to the job, only while the job exists (a fast job may be gone already). */
const WRITE_OWNER_SCRIPT = `if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], '${OWNER_FIELD}', ARGV[1]) end return 0`

/**
 * Stores a job's owner in its own hash field, where {@link readOwner} reads it alone. Called
 * right after the job is added, on the connection that added it, so it lands before anything a
 * client does with the job id; a job read before it falls back to `data.owner`.
 */
export async function writeOwner (redis: Commands, keys: Keys, queue: string, jobId: string, owner: string): Promise<void> {
  await redis.eval(WRITE_OWNER_SCRIPT, 1, keys.job(queue, jobId), owner)
}
