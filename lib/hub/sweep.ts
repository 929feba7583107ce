import { isFinal } from '../core/event'
import type { Commands } from '../core/snapshot'
import type { Watch } from './watch'
import type { WatchedJobs } from './watches'

/** What the sweep asks of convergence: a pipelined re-read of the watches it picked. */
export interface Rereads {
  reread: (watches: Watch[], cause: string) => Promise<void>
}

/**
 * The safety sweep: a fixed budget of reads per second, round robin over unfinished watches. It
 * only bounds how long a loss that no fault revealed could last.
 */
export class Sweep {
  readonly #redis: Commands
  readonly #watches: WatchedJobs
  readonly #rereads: Rereads
  readonly #timer: NodeJS.Timeout | null
  #queue: Watch[] = []
  #credit = 0

  /** Starts the sweep, once a second; a budget of 0 turns it off. */
  constructor (budget: number, redis: Commands, watches: WatchedJobs, rereads: Rereads) {
    this.#redis = redis
    this.#watches = watches
    this.#rereads = rereads
    this.#timer = budget > 0 ? setInterval(() => { void this.#step(budget) }, 1_000).unref() : null
  }

  stop (): void {
    if (this.#timer !== null) clearInterval(this.#timer)
  }

  async #step (budget: number): Promise<void> {
    if (this.#watches.closed || this.#redis.status !== 'ready') return
    // A fractional budget accrues: 0.2 is one read every 5 s.
    this.#credit = Math.min(this.#credit + budget, Math.max(1, budget))
    const take = Math.floor(this.#credit)
    if (take === 0) return
    this.#credit -= take
    const picked: Watch[] = []
    while (picked.length < take) {
      if (this.#queue.length === 0) {
        this.#queue = this.#watches.list()
        if (this.#queue.length === 0) break
      }
      const watch = this.#queue.pop() as Watch
      if (this.#watches.isWatched(watch) && watch.last !== null && !isFinal(watch.last.state) && !watch.refreshing) picked.push(watch)
      if (picked.length + this.#queue.length === 0) break
    }
    if (picked.length > 0) await this.#rereads.reread(picked, 'sweep')
  }
}
