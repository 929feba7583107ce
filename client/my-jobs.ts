import { JobProgressError } from './errors'
import type { MyJob, MyJobsFilter } from './my-jobs-list'
import { iterate } from './watch'

export type { MyJob, MyJobsFilter }

type Listener<T> = (value: T) => void

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
  /** The list's code (client/my-jobs-list.ts), once loaded. */
  #l?: typeof import('./my-jobs-list')

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
    import('./my-jobs-list').then(async (l) => {
      this.#l = l
      return l.rows(await this.#read(l.query(this.#filter)))
    }).then((jobs) => {
      if (n !== this.#reads || this.ended) return
      this.jobs = jobs
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

  #apply (m: any): void {
    this.jobs = this.#l!.apply(this.jobs, m, this.#filter)
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
