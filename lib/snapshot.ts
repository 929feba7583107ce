import type { Redis } from 'ioredis'
import { eta, parseProgress, type JobEvent, type JobState } from './events'
import type { Keys } from './keys'

/** A job's current state read from Redis, with what the routes need besides the event. */
export interface Snapshot {
  event: JobEvent
  /** Who uploaded it; null when it was not read (`withData` false). */
  owner: string | null
  /** When the current attempt started (ms), for the ETA. */
  startedAt: number | null
  /** The job's data as stored at upload (when read). */
  data: Record<string, unknown> | null
}

export interface SnapshotTarget {
  kind: string
  queue: string
  jobId: string
}

// `timestamp` is read only to know the job exists: a job that never started has none of the others.
const FIELDS = ['progress', 'returnvalue', 'failedReason', 'finishedOn', 'processedOn', 'ats', 'atm', 'timestamp', 'data'] as const
const PER_JOB = 5

function json (text: string | null): unknown {
  if (text === null || text === '') return null
  try {
    return JSON.parse(text)
  } catch {
    return text
  }
}

/**
 * Reads many jobs in one pipelined round trip: the job hash, whether it is completed, failed or
 * active, and its cancellation mark. Null for a job that does not exist.
 */
export async function readSnapshots (redis: Redis, keys: Keys, targets: SnapshotTarget[], withData: boolean): Promise<Array<Snapshot | null>> {
  if (targets.length === 0) return []
  const pipe = redis.pipeline()
  const fields = withData ? FIELDS : FIELDS.slice(0, -1)
  for (const { queue, jobId } of targets) {
    pipe.hmget(keys.job(queue, jobId), ...fields)
    pipe.zscore(keys.queueKey(queue, 'completed'), jobId)
    pipe.zscore(keys.queueKey(queue, 'failed'), jobId)
    pipe.lpos(keys.queueKey(queue, 'active'), jobId)
    pipe.get(keys.cancel(queue, jobId))
  }
  const replies = await pipe.exec()
  if (replies === null) throw new Error('pipeline was discarded')
  const now = Date.now()
  return targets.map((target, i) => {
    const at = (n: number): unknown => {
      const [err, value] = replies[i * PER_JOB + n]
      if (err !== null) throw err
      return value
    }
    return toSnapshot(target, at(0) as Array<string | null>, at(1) !== null, at(2) !== null, at(3) !== null, at(4) as string | null, withData, now)
  })
}

function toSnapshot (target: SnapshotTarget, hash: Array<string | null>, completed: boolean, failed: boolean, active: boolean, cancelOwner: string | null, withData: boolean, now: number): Snapshot | null {
  const [progress, returnvalue, failedReason, finishedOn, processedOn, ats, atm, , rawData] = hash
  const exists = hash.some(v => v !== null)
  if (!exists && cancelOwner === null) return null

  const started = Number(ats ?? 0)
  const made = Number(atm ?? 0)
  const parsed = parseProgress(json(progress))
  let { processed, total } = parsed
  let state: JobState
  let attempt: number
  if (completed || (finishedOn !== null && returnvalue !== null && failedReason === null)) {
    state = 'completed'
    attempt = Math.max(started, made, 1)
    if (total > 0) processed = total
  } else if (cancelOwner !== null) {
    state = 'cancelled'
    attempt = Math.max(started, made, 1)
  } else if (failed || finishedOn !== null) {
    state = 'failed'
    attempt = Math.max(started, made, 1)
  } else if (active) {
    state = 'active'
    attempt = Math.max(started, 1)
    // The progress a failed attempt left behind is not this attempt's: the retry starts at 0.
    if (parsed.attempt !== undefined && parsed.attempt < attempt) {
      processed = 0
      total = 0
    }
  } else {
    // Waiting, delayed, or moved back after a stall or a failed attempt: the next attempt.
    state = 'queued'
    attempt = started + 1
    processed = 0
    total = started === 0 ? total : 0
  }
  const startedAt = processedOn === null ? null : Number(processedOn)
  const data = withData ? json(rawData ?? null) as Record<string, unknown> | null : null
  const owner = withData ? (typeof data?.owner === 'string' ? data.owner : cancelOwner) : null
  const event: JobEvent = {
    kind: target.kind,
    jobId: target.jobId,
    state,
    processed,
    total,
    attempt,
    etaSeconds: eta(state, processed, total, startedAt, now),
    ts: now
  }
  if (state === 'completed') event.result = json(returnvalue)
  if (state === 'failed') event.error = failedReason ?? 'failed'
  if (state === 'cancelled') event.error = 'cancelled'
  return { event, owner, startedAt, data }
}
