import type { Cluster, Redis } from 'ioredis'
import { eta, parseProgress, type JobEvent, type JobState } from './event'
import { progressDetails } from './progress-details'
import { OWNER_FIELD, type Keys } from './keys'
import { OWNER_SCRIPT, SNAPSHOT_SCRIPT } from './snapshot-scripts'
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
    const [prefix, lockSuffix, cancelSuffix] = jobKeyParts(keys, queue)
    const args: Array<string | number> = [6,
      keys.queueKey(queue, 'completed'), keys.queueKey(queue, 'failed'), keys.queueKey(queue, 'delayed'),
      keys.queueKey(queue, 'prioritized'), keys.queueKey(queue, 'waiting-children'), keys.queueKey(queue, 'events'),
      withData ? '1' : '0', prefix, lockSuffix, cancelSuffix]
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
    let reply = replies[c]
    if (!(reply instanceof Error)) {
      try {
        reply = JSON.parse(reply as string)
      } catch (err) {
        reply = err as Error
      }
    }
    call.forEach((i, j) => {
      if (reply instanceof Error) out[i] = reply
      else {
        const row = (reply as Array<Array<string | false> | string | false>)[j]
        // A string: the owner alone of somebody else's job ('?').
        out[i] = row === false || row === null || row === undefined ? null : typeof row === 'string' ? row : toSnapshot(targets[i], nils(row), withData, now)
      }
    })
  })
  return out
}

/** A row of the script's JSON reply with Redis's nil (false there) as null. */
function nils (row: Array<string | false>): Reply {
  const out: Reply = new Array(row.length)
  for (let k = 0; k < row.length; k++) out[k] = row[k] === false ? null : row[k] as string
  return out
}

/**
 * A job's hash key of `queue` without the id, then the suffixes of its lock and its cancellation
 * mark, as {@link Keys} makes them (checked on a sample id, so the two cannot disagree).
 */
function jobKeyParts (keys: Keys, queue: string): [string, string, string] {
  const cached = keyParts.get(keys)?.get(queue)
  if (cached !== undefined) return cached
  const probe = '00000000-0000-4000-8000-000000000000'
  const job = keys.job(queue, probe)
  const lock = keys.lock(queue, probe)
  const cancel = keys.cancel(queue, probe)
  if (!job.endsWith(probe) || !lock.startsWith(job) || !cancel.startsWith(job)) throw new Error('job keys must be the job hash key followed by a suffix')
  const parts: [string, string, string] = [job.slice(0, -probe.length), lock.slice(job.length), cancel.slice(job.length)]
  let byQueue = keyParts.get(keys)
  if (byQueue === undefined) keyParts.set(keys, byQueue = new Map())
  byQueue.set(queue, parts)
  return parts
}
const keyParts = new WeakMap<Keys, Map<string, [string, string, string]>>()

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
