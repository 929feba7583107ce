import { JobProgressError } from './errors'
import type { JobStatus } from './types'
import { iterate } from './watch'

type Listener<T> = (value: T) => void

/** One of the caller's jobs, as the list route gives it and the feed keeps it current. */
export interface MyJob {
  kind: string
  jobId: string
  /** Followed live from the feed. */
  status: JobStatus
  /** Percent done, counts, ETA, stage and message: as of the last read of the list (watch the job for its progress). */
  progress: number
  processed: number
  total: number
  etaSeconds: number | null
  /** Why it ended, on `failed` and `cancelled` (as of the last read). */
  error: string | null
  /** Milliseconds since the epoch (for a job the feed added: when the message was sent, to the second). */
  createdAt: number
  stage?: string
  message?: string
}

/** Which of the caller's jobs to follow: kinds, states (a job that leaves them leaves the list), at most `limit` (1 to 100). */
export interface MyJobsFilter {
  kind?: string | string[]
  state?: JobStatus | JobStatus[]
  /** @default 20 */
  limit?: number
}

/** The list route's query for a filter (a list as its items joined with commas). */
const listQuery = (f: MyJobsFilter): string => Object.entries(f).map(([k, v]) => `${k}=${encodeURIComponent([v].flat() + '')}`).join('&')

/**
 * The caller's jobs, newest first: the list route read once the feed is in effect, then kept
 * current by the feed (created, running, finished, removed), and read again after every reconnect
 * and resync, so no change is lost. An async iterable of lists (the latest one: a slow reader
 * skips lists, never grows memory), like a Watch of its updates.
 */
export class MyJobs implements AsyncIterable<MyJob[]> {
  /** The list, newest first; empty until it was read (`ready`). */
  jobs: MyJob[] = []
  ready = false
  /** Once ended: the error it ended with (credentials, a server without the feed, a refused filter), or null after close(). */
  error: Error | null = null
  ended = false
  #fns = new Set<Listener<MyJob[]>>()
  /** Feed messages that came while the list was being read, to apply on top of it. */
  #pending?: any[]
  #reads = 0
  #filter: MyJobsFilter
  #read: (query: string) => Promise<any[]>
  #drop: () => void

  constructor (filter: MyJobsFilter, read: (query: string) => Promise<any[]>, drop: () => void) {
    this.#filter = filter
    this.#read = read
    this.#drop = drop
  }

  /** Calls `fn` with every new list (and at once with the current one, once read); returns the unsubscribe. */
  onUpdate (fn: Listener<MyJob[]>): () => void {
    this.#fns.add(fn)
    if (this.ready) fn(this.jobs)
    return () => this.#fns.delete(fn)
  }

  /** Stops following (the connection unsubscribes the feed once no list follows it). */
  close (): void {
    this._end()
  }

  /** @internal Reads the list again: the feed is (again) in effect, or said to. */
  _sync (): void {
    const n = ++this.#reads
    // Whatever came before this read is in its answer.
    this.#pending = []
    this.#read(listQuery(this.#filter)).then((rows) => {
      if (n !== this.#reads || this.ended) return
      this.jobs = rows.map(({ job_id: jobId, eta_seconds: etaSeconds, created_at: createdAt, ...j }) => ({ ...j, jobId, etaSeconds, createdAt }))
      for (const m of this.#pending as any[]) this.#apply(m)
      this.#pending = undefined
      this.ready = true
      this.#emit()
    }, (error: Error) => {
      if (n !== this.#reads || this.ended) return
      this.#pending = undefined
      // Refused (credentials, filter, no such route): it ends; the network: read again soon.
      if (error instanceof JobProgressError) this._end(error)
      else setTimeout(() => { if (n === this.#reads) this._sync() }, 2000)
    })
  }

  /** @internal A message of the `jobs` protocol or an SSE event: the feed's changes, its resync, its subscription. */
  _msg (type: string, m: any): void {
    if (type === 'my_job') {
      // Bounded: past 1,000 changes during one read, a new read has them all.
      if (this.#pending && this.#pending.push(m) > 1000) this._sync()
      if (this.ready) {
        this.#apply(m)
        this.#emit()
      }
    } else if (type === 'my_jobs_resync' || (type === 'subscribed' && (m.job_id ?? m.feed) === 'mine')) this._sync()
    else if (type === 'error' && !m.job_id && /feed/.test(m.message)) this._end(new JobProgressError(m.message))
  }

  /** @internal */
  _end (error?: Error): void {
    if (this.ended) return
    this.ended = true
    this.error = error ?? null
    this.#drop()
    this.#emit()
  }

  #apply ({ job_id: jobId, kind, status, ts }: any): void {
    const { kind: kinds = kind, state = status, limit = 20 } = this.#filter
    if (![kinds].flat().includes(kind)) return
    const jobs = [...this.jobs]
    const i = jobs.findIndex(j => j.jobId === jobId)
    const keep = status !== 'removed' && [state].flat().includes(status)
    if (!keep) i < 0 || jobs.splice(i, 1)
    else if (i < 0) jobs.unshift({ kind, jobId, status, progress: 0, processed: 0, total: 0, etaSeconds: null, error: null, createdAt: ts * 1000 })
    else jobs[i] = { ...jobs[i], status }
    this.jobs = jobs.slice(0, limit)
  }

  #emit (): void {
    for (const fn of this.#fns) fn(this.jobs)
  }

  /** Yields the list each time it changes (the latest one), until closed; throws the error it ended with. */
  async * [Symbol.asyncIterator] (): AsyncIterator<MyJob[]> {
    let last: MyJob[] | undefined
    yield * iterate<MyJob[]>(this, push => this.onUpdate(jobs => { if (jobs !== last) push(last = jobs) }), true)
    if (this.error) throw this.error
  }
}
