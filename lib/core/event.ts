import { detailsDiffer } from './progress-details'
import { compareEntryIds } from '../wire/version'

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
 * Whether `next` should replace `last`: the one order every choice between two states uses.
 * Nothing follows a final state, and a final replaces anything else. Otherwise the version
 * decides (see `lib/wire/version.ts`): the stream entry id, one total order per queue, and not
 * the attempt, which a snapshot infers (a queued job, or an active one whose lock lapsed, gets
 * its next attempt) while the real attempt's events may still come. Progress that goes down
 * because a worker started a new stage is then newer, as it is. At one entry id the later read
 * replaces the earlier only when it says something else (a lock lapsed: no entry marks it).
 *
 * States without a version (the relay messages of an older instance during a rolling upgrade)
 * are ordered as before versions existed: {@link isNewer}.
 */
export function supersedes (next: JobEvent, last: JobEvent | null): boolean {
  if (last === null) return true
  if (isFinal(last.state)) return false
  if (isFinal(next.state)) return true
  const a = entryOf(next)
  const b = entryOf(last)
  if (a === null || b === null) return isNewer(next, last)
  const order = compareEntryIds(a, b)
  return order !== 0 ? order > 0 : sameState(next, last) === false
}

/** Whether two states tell a watcher the same thing (their versions and times aside). */
export function sameState (a: JobEvent, b: JobEvent): boolean {
  return a.state === b.state && a.attempt === b.attempt && a.processed === b.processed && a.total === b.total && !detailsDiffer(a, b)
}

/** The stream entry id of a state's version, or null when it has none. */
export function entryOf (event: JobEvent): string | null {
  const v = event.version
  if (v === undefined) return null
  const dot = v.indexOf('.')
  return dot < 0 ? null : v.slice(dot + 1)
}

/**
 * The order of states before versions: (final, attempt, state, processed), so progress never
 * goes back within an attempt, a retry restarts it, and nothing follows a final state. Kept only
 * for states without a version; it drops a stage whose counts start again.
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
