import type { Cluster, Redis } from 'ioredis'
import { eta, parseProgress, type JobEvent, type JobState } from './event'
import { progressDetails } from './progress-details'
import { OWNER_FIELD, type Keys } from './keys'
import { formatVersion, NO_ENTRY } from '../wire/version'
import { isCluster } from './redis-client'
import { slotOf } from './slot'

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

/** Most jobs one snapshot script reads: Redis runs nothing else meanwhile (about 1 ms for 100). */
const JOBS_PER_SCRIPT = 100

/**
 * One script reads up to {@link JOBS_PER_SCRIPT} jobs of one queue, so each job, where it sits and
 * the stream's last entry id are read at one instant: a relayed event is then newer than the
 * snapshot exactly when its entry id is larger. Every read is O(1) (or O(log N) for the stream's
 * tail): ZSCORE on the sorted sets and EXISTS on the lock, never BullMQ's LPOS over the active or
 * waiting lists, whose cost grows with the queue. One command for many jobs: a storm of
 * subscriptions costs the instance one command to encode and one reply to decode per hundred.
 *
 * KEYS: the queue's completed, failed, delayed, prioritized, waiting-children and events keys,
 * then for each job its hash, its lock and its cancellation mark. ARGV: '1' to read `data`, then
 * for each job its id and the owner expected after a '=' (or '' to read it whoever owns it); after
 * a '?' instead, a job of somebody else answers its owner alone (for an access policy to decide).
 *
 * Each job's owner is read first, alone from its own field; only jobs written before that field
 * existed pay for decoding their data. When owners are checked, a job of somebody else and one
 * that does not exist stop right there, after the same reads as {@link OWNER_SCRIPT}'s, and both
 * answer nil: nothing of the job leaves Redis, and its data is read only once the check passed.
 */
const SNAPSHOT_SCRIPT = `
local last = nil
local out = {}
local n = (#KEYS - 6) / 3
for i = 0, n - 1 do
  local job = KEYS[7 + 3 * i]
  local o = redis.call('HMGET', job, '${OWNER_FIELD}', 'timestamp')
  local cancel = redis.call('GET', KEYS[9 + 3 * i])
  local owner = o[1]
  local data = false
  if not owner and o[2] then
    data = redis.call('HGET', job, 'data')
    local ok, decoded = pcall(cjson.decode, data or '')
    if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then owner = decoded.owner end
  end
  if not owner then owner = cancel end
  local want = ARGV[3 + 2 * i]
  if want ~= '' and (not owner or owner == '' or string.sub(want, 2) ~= owner) then
    if string.sub(want, 1, 1) == '?' and owner and owner ~= '' then out[i + 1] = owner else out[i + 1] = false end
  else
    if ARGV[1] == '1' and not data then data = redis.call('HGET', job, 'data') end
    local id = ARGV[2 + 2 * i]
    local h = redis.call('HMGET', job, 'progress', 'returnvalue', 'failedReason', 'finishedOn', 'processedOn', 'ats', 'atm')
    local where = ''
    -- BullMQ writes finishedOn in the script that adds a job to completed or failed, and
    -- processedOn in the one that takes its lock: without them neither set nor the lock is asked.
    if h[4] and redis.call('ZSCORE', KEYS[1], id) then where = 'completed'
    elseif h[4] and redis.call('ZSCORE', KEYS[2], id) then where = 'failed'
    elseif h[5] and redis.call('EXISTS', KEYS[8 + 3 * i]) == 1 then where = 'active'
    elseif redis.call('ZSCORE', KEYS[3], id) then where = 'delayed'
    elseif redis.call('ZSCORE', KEYS[4], id) then where = 'prioritized'
    elseif redis.call('ZSCORE', KEYS[5], id) then where = 'waiting-children'
    end
    if not last then
      local tail = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)
      last = '0-0'
      if tail[1] then last = tail[1][1] end
    end
    if ARGV[1] ~= '1' then data = false end
    -- A cancelled job's hash is gone: the attempt it was cancelled in is kept beside the mark.
    local cancelled = false
    if cancel then cancelled = redis.call('GET', KEYS[9 + 3 * i] .. ':attempt') end
    out[i + 1] = {h[1], h[2], h[3], h[4], h[5], h[6], h[7], o[2], where, cancel, last, owner, data, cancelled}
  end
end
return out
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
  jpSnapshots: (...args: Array<string | number>) => Promise<unknown[]>
  jpOwner: (...args: string[]) => Promise<string | null>
}

/** Teaches a connection (or a pipeline made from it) the plugin's two scripts, once. */
export function withScripts (redis: Commands): void {
  const r = redis as Commands & Partial<Scripted>
  if (typeof r.jpSnapshots === 'function') return
  // The number of keys is the first argument: it depends on the number of jobs read.
  redis.defineCommand('jpSnapshots', { lua: SNAPSHOT_SCRIPT })
  redis.defineCommand('jpOwner', { numberOfKeys: 2, lua: OWNER_SCRIPT })
}

/** The owner of a job, or null when it does not exist: one small script, nothing else. */
export async function readOwner (redis: Commands, keys: Keys, target: SnapshotTarget): Promise<string | null> {
  withScripts(redis)
  const owner = await (redis as unknown as Scripted).jpOwner(keys.job(target.queue, target.jobId), keys.cancel(target.queue, target.jobId))
  return typeof owner === 'string' && owner !== '' ? owner : null
}

/**
 * The owners of many jobs in one pipelined round trip (one small script each), in order: null
 * for a job that does not exist, an Error for a read Redis refused. On a cluster, one pipeline
 * per slot, run side by side.
 */
export async function readOwners (redis: Commands, keys: Keys, targets: SnapshotTarget[]): Promise<Array<string | null | Error>> {
  if (targets.length === 0) return []
  withScripts(redis)
  const replies = await pipelined(redis, keys, targets, (pipe, i) => { void pipe.jpOwner(keys.job(targets[i].queue, targets[i].jobId), keys.cancel(targets[i].queue, targets[i].jobId)) })
  return replies.map(owner => owner instanceof Error ? owner : typeof owner === 'string' && owner !== '' ? owner : null)
}

/**
 * Reads many jobs in one round trip. Null for a job that does not exist. Throws when Redis
 * refused a read.
 */
export async function readSnapshots (redis: Commands, keys: Keys, targets: SnapshotTarget[], withData: boolean): Promise<Array<Snapshot | null>> {
  const read = await readJobs(redis, keys, targets, withData, undefined)
  return read.map(r => {
    if (r instanceof Error) throw r
    return typeof r === 'string' ? null : r
  })
}

/**
 * The first read of jobs opened for watchers, in one round trip, each job's owner checked first
 * when `owners` names one (an entry per target; undefined reads the job whoever owns it). Null
 * for a job that does not exist and, alike, for a job of somebody else (the script stops after
 * the same reads and answers the same nil); an Error for a script call Redis refused, given to
 * every job of that call (up to a hundred of one queue).
 */
export async function readOpens (redis: Commands, keys: Keys, targets: SnapshotTarget[], owners: Array<string | undefined>): Promise<Array<Snapshot | null | Error>> {
  const read = await readJobs(redis, keys, targets, false, owners.map(owner => owner === undefined ? '' : `=${owner}`))
  // Never asked for an owner alone ('?'): a string cannot come back.
  return read.map(r => typeof r === 'string' ? null : r)
}

/**
 * A job read for `requester`, in one script that checks the owner before it reads anything else:
 * its snapshot when `requester` owns it; null when it does not exist or, alike (the same reads,
 * the same reply), belongs to somebody else. With `others`, somebody else's job answers its
 * owner alone instead, so an access policy can decide on it; nothing else of it is read.
 * Throws when Redis refused the read.
 */
export async function readOwned (redis: Commands, keys: Keys, target: SnapshotTarget, requester: string, withData: boolean, others: boolean): Promise<Snapshot | string | null> {
  const [read] = await readJobs(redis, keys, [target], withData, [`${others ? '?' : '='}${requester}`])
  if (read instanceof Error) throw read
  return read
}

/**
 * Reads jobs with one script call per queue and {@link JOBS_PER_SCRIPT} jobs, the calls pipelined
 * (a queue's keys share a slot: on a cluster, one pipeline per slot, run side by side).
 */
async function readJobs (redis: Commands, keys: Keys, targets: SnapshotTarget[], withData: boolean, owners: string[] | undefined): Promise<Array<Snapshot | string | null | Error>> {
  if (targets.length === 0) return []
  withScripts(redis)
  const now = Date.now()
  // Calls in order of first appearance: one queue is one call per hundred jobs.
  const calls: number[][] = []
  const open = new Map<string, number[]>()
  for (let i = 0; i < targets.length; i++) {
    const queue = targets[i].queue
    let call = open.get(queue)
    if (call === undefined || call.length >= JOBS_PER_SCRIPT) {
      call = []
      calls.push(call)
      open.set(queue, call)
    }
    call.push(i)
  }
  const argsOf = (call: number[]): Array<string | number> => {
    const queue = targets[call[0]].queue
    const args: Array<string | number> = [6 + 3 * call.length,
      keys.queueKey(queue, 'completed'), keys.queueKey(queue, 'failed'), keys.queueKey(queue, 'delayed'),
      keys.queueKey(queue, 'prioritized'), keys.queueKey(queue, 'waiting-children'), keys.queueKey(queue, 'events')]
    for (const i of call) args.push(keys.job(queue, targets[i].jobId), keys.lock(queue, targets[i].jobId), keys.cancel(queue, targets[i].jobId))
    args.push(withData ? '1' : '0')
    for (const i of call) args.push(targets[i].jobId, owners?.[i] ?? '')
    return args
  }
  let replies: unknown[]
  if (calls.length === 1) {
    try {
      replies = [await (redis as unknown as Scripted).jpSnapshots(...argsOf(calls[0]))]
    } catch (err) {
      replies = [err instanceof Error ? err : new Error(String(err))]
    }
  } else {
    replies = await pipelined(redis, keys, calls.map(call => targets[call[0]]), (pipe, c) => { void pipe.jpSnapshots(...argsOf(calls[c])) })
  }
  const out: Array<Snapshot | string | null | Error> = new Array(targets.length)
  calls.forEach((call, c) => {
    const reply = replies[c]
    call.forEach((i, j) => {
      if (reply instanceof Error) out[i] = reply
      else {
        const row = (reply as Array<Reply | string | null>)[j]
        // A string: the owner alone of somebody else's job ('?').
        out[i] = row === null || row === undefined ? null : typeof row === 'string' ? row : toSnapshot(targets[i], row, withData, now)
      }
    })
  })
  return out
}

type Pipe = Scripted & { exec: () => Promise<Array<[Error | null, unknown]> | null> }

/**
 * Script calls pipelined, `call(pipe, c)` adding the c-th (`targets[c]` names its slot): each
 * call's reply, or the Error Redis answered for it. A cluster pipeline must stay on one node: one
 * pipeline per slot, run side by side.
 */
async function pipelined (redis: Commands, keys: Keys, targets: SnapshotTarget[], call: (pipe: Pipe, c: number) => void): Promise<unknown[]> {
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

async function onePipeline (redis: Commands, indexes: number[], call: (pipe: Pipe, c: number) => void): Promise<unknown[]> {
  const pipe = redis.pipeline() as unknown as Pipe
  for (const i of indexes) call(pipe, i)
  let replies: Array<[Error | null, unknown]> | null
  try {
    replies = await pipe.exec()
  } catch (err) {
    // The whole pipeline failed (the connection is gone): every call answers the error.
    const error = err instanceof Error ? err : new Error(String(err))
    return indexes.map(() => error)
  }
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
  const [progress, returnvalue, failedReason, finishedOn, processedOn, ats, atm, timestamp, rawWhere, cancelOwner, last, owner, rawData, cancelAttempt] = reply
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
    // The cancel deleted the hash (and with it ats/atm): its mark keeps the attempt it stopped.
    attempt = Math.max(started, made, Number(cancelAttempt ?? 0) || 0, 1)
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
