import type { JobStatus, JobUpdate } from './types'

/**
 * One of the caller's jobs, as the list route gives it and the feed keeps it current: a job's
 * state without its result, version or data. `status` is followed live from the feed; progress,
 * counts, ETA, stage, message and `error` are as of the last read of the list (watch the job for
 * its progress).
 */
export interface MyJob extends Pick<JobUpdate, 'kind' | 'jobId' | 'status' | 'progress' | 'processed' | 'total' | 'etaSeconds' | 'error' | 'stage' | 'message'> {
  /** Milliseconds since the epoch (for a job the feed added: when the message was sent, to the second). */
  createdAt: number
}

/** Which of the caller's jobs to follow: kinds, states (a job that leaves them leaves the list), at most `limit` (1 to 100). */
export interface MyJobsFilter {
  kind?: string | string[]
  state?: JobStatus | JobStatus[]
  /** @default 20 */
  limit?: number
}

/**
 * How a list of the caller's jobs is read and kept: the route's query, its rows, a change from
 * the feed. Loaded with the first read (a bundler makes it a chunk of its own).
 */

/** The list route's query for a filter (a list as its items joined with commas). */
export const query = (f: MyJobsFilter): string => Object.entries(f).map(([k, v]) => `${k}=${encodeURIComponent([v].flat() + '')}`).join('&')

/** The list route's rows under the client's names. */
export const rows = (list: any[]): MyJob[] => list.map(({ job_id: jobId, eta_seconds: etaSeconds, created_at: createdAt, ...j }) => ({ ...j, jobId, etaSeconds, createdAt }))

/** The list after a change from the feed: a new job at the top, a state changed, a job gone or out of the filter. */
export function apply (list: MyJob[], { job_id: jobId, kind, status, ts }: any, f: MyJobsFilter): MyJob[] {
  const { kind: kinds = kind, state = status, limit = 20 } = f
  if (![kinds].flat().includes(kind)) return list
  const jobs = [...list]
  const i = jobs.findIndex(j => j.jobId === jobId)
  const keep = status !== 'removed' && [state].flat().includes(status)
  if (!keep) i < 0 || jobs.splice(i, 1)
  else if (i < 0) jobs.unshift({ kind, jobId, status, progress: 0, processed: 0, total: 0, etaSeconds: null, error: null, createdAt: ts * 1000 })
  else jobs[i] = { ...jobs[i], status }
  return jobs.slice(0, limit)
}
