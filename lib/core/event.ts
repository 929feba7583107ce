import { detailsDiffer } from './progress-details'

/** The one internal event every protocol renders. */
export type JobState = 'queued' | 'active' | 'completed' | 'failed' | 'cancelled'

export interface JobEvent {
  kind: string
  jobId: string
  state: JobState
  /** Items done, as the worker reported them. */
  processed: number
  /** Items in all, as the worker reported them (0 until known). */
  total: number
  /** 1 for the first attempt; a retry starts a new attempt with its own progress. */
  attempt: number
  /** Whole seconds left, from the rate of processed items; null until it can be known. */
  etaSeconds: number | null
  /** The job's return value, on `completed`. */
  result?: unknown
  /** Why it ended, on `failed` and `cancelled`. */
  error?: string
  /** Milliseconds since the epoch when the state was observed. */
  ts: number
  /**
   * The job's version (see `lib/wire/version.ts`): the attempt and the event stream entry that
   * produced this state. Absent where the source of the state could not say.
   */
  version?: string
  /** The worker's stage, message and small data of its last report (see lib/core/progress-details.ts). */
  stage?: string
  message?: string
  data?: unknown
}

export function isFinal (state: JobState): boolean {
  return state === 'completed' || state === 'failed' || state === 'cancelled'
}

const RANK: Record<JobState, number> = { queued: 0, active: 1, completed: 2, failed: 2, cancelled: 2 }

/**
 * Whether `next` should replace `last`: ordered by (final, attempt, state, processed), so progress
 * never goes back within an attempt, a retry restarts it, and nothing follows a final state.
 */
export function isNewer (next: JobEvent, last: JobEvent | null): boolean {
  if (last === null) return true
  if (isFinal(last.state)) return false
  if (isFinal(next.state)) return true
  if (next.attempt !== last.attempt) return next.attempt > last.attempt
  if (RANK[next.state] !== RANK[last.state]) return RANK[next.state] > RANK[last.state]
  if (next.processed !== last.processed) return next.processed > last.processed
  return next.total !== last.total || detailsDiffer(next, last)
}

/** Percentage done, 0-100, one decimal. */
export function percent (event: JobEvent): number {
  if (event.state === 'completed') return 100
  if (event.total <= 0) return 0
  return Math.min(100, Math.round((event.processed / event.total) * 1000) / 10)
}

/**
 * Reads BullMQ's progress value, a number (percent) or `{ processed, total, attempt? }`. BullMQ
 * keeps a job's progress across retries, so `attempt` (written by the worker helper) is what tells
 * a retry's first reports from the failed attempt's last one.
 */
export function parseProgress (value: unknown): { processed: number, total: number, attempt?: number } {
  if (typeof value === 'number' && Number.isFinite(value)) return { processed: Math.max(0, value), total: 100 }
  if (value !== null && typeof value === 'object') {
    const { processed, total, attempt } = value as Record<string, unknown>
    if (typeof processed === 'number' && Number.isFinite(processed)) {
      const parsed: { processed: number, total: number, attempt?: number } = { processed: Math.max(0, processed), total: typeof total === 'number' && Number.isFinite(total) ? Math.max(0, total) : 0 }
      if (typeof attempt === 'number' && Number.isInteger(attempt) && attempt >= 1) parsed.attempt = attempt
      return parsed
    }
  }
  return { processed: 0, total: 0 }
}

/** ETA from the average rate since the attempt started: the same on every instance. */
export function eta (state: JobState, processed: number, total: number, startedAt: number | null, now: number): number | null {
  if (state === 'completed') return 0
  if (state !== 'active' || startedAt === null || processed <= 0 || total <= 0 || now <= startedAt) return null
  return Math.max(0, Math.round(((total - processed) * (now - startedAt)) / processed / 1000))
}
