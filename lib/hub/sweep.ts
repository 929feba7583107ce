import { isFinal } from '../core/event'
import type { Commands } from '../core/snapshot'
import type { Watch } from './watch'
import type { WatchedJobs } from './watches'

/** What the sweep asks of convergence: a pipelined re-read of the watches it picked. */
export interface Rereads {
  reread: (watches: Watch[], cause: string) => Promise<unknown>
}

/** The longest time between two steps of the sweep. */
const MAX_TICK_MS = 1_000

export interface SweepOptions {
  /** Every unfinished watched job is re-read at least once per period; 0 turns the sweep off. */
  periodMs: number
  /** Most reads per second (the deprecated `sweepReadsPerSecond`); the period then grows past `periodMs`. */
  maxReadsPerSecond?: number
}

/**
 * The safety sweep: every unfinished watched job re-read at least once per period, whatever
 * else read it, so a loss that no fault revealed lasts at most that long. The watches are kept
 * in the order of their last read (any read: an open, a re-read after an event or a fault, the
 * sweep's), and each step reads the oldest ones at a rate of (watches) / (period), so the reads
 * are spread evenly over the period instead of coming in a burst, and a job read for another
 * reason meanwhile is not read again before it is due. Each job costs 1 / period reads per
 * second: 1 / 600 s at the default, about 0.0017, a read being at most one command (one script
 * reads up to a hundred jobs of a queue).
 */
export class Sweep {
  readonly #redis: Commands
  readonly #watches: WatchedJobs
  readonly #rereads: Rereads
  readonly #periodMs: number
  readonly #tickMs: number
  readonly #maxPerTick: number
  readonly #timer: NodeJS.Timeout | null
  /** Unfinished watches, oldest read first, with the time of that read. */
  readonly #due = new Map<Watch, number>()
  #credit = 0
  #stepping = false

  constructor (opts: SweepOptions, redis: Commands, watches: WatchedJobs, rereads: Rereads) {
    this.#redis = redis
    this.#watches = watches
    this.#rereads = rereads
    this.#periodMs = opts.periodMs
    // A short period (tests) gets finer steps, so that its reads are spread too.
    this.#tickMs = Math.max(10, Math.min(MAX_TICK_MS, Math.floor(opts.periodMs / 20)))
    const cap = opts.maxReadsPerSecond
    this.#maxPerTick = cap === undefined ? Infinity : (cap * this.#tickMs) / 1000
    this.#timer = opts.periodMs > 0 && cap !== 0 ? setInterval(() => { void this.#step() }, this.#tickMs).unref() : null
  }

  /** Watches the sweep would read within a period (for tests and metrics). */
  get size (): number {
    return this.#due.size
  }

  /** A read of the watch's job was applied: it is not due again for a period. */
  read (watch: Watch): void {
    if (this.#timer === null) return
    this.#due.delete(watch)
    if (watch.last !== null && !isFinal(watch.last.state)) this.#due.set(watch, Date.now())
  }

  /** The watch was let go. */
  forget (watch: Watch): void {
    this.#due.delete(watch)
  }

  stop (): void {
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#due.clear()
  }

  async #step (): Promise<void> {
    if (this.#stepping || this.#watches.closed || this.#redis.status !== 'ready') return
    // Two steps short of the period, so that the rate alone reads every job in time and the
    // overdue rule below is only a safety net (it alone would pull reads forward, step by step).
    const perTick = (this.#due.size * this.#tickMs) / Math.max(this.#tickMs, this.#periodMs - 2 * this.#tickMs)
    // The rate accrues (one job every 600 s is a fraction of a read per step), but not past one
    // step's worth and one read: an idle sweep saves nothing up for a burst.
    const rate = Math.min(perTick, this.#maxPerTick)
    this.#credit = Math.min(this.#credit + rate, rate + 1)
    const now = Date.now()
    const picked: Watch[] = []
    for (const [watch, readAt] of this.#due) {
      if (!this.#watches.isWatched(watch) || watch.last === null || isFinal(watch.last.state)) {
        this.#due.delete(watch)
        continue
      }
      // Past the rate, only what would be overdue by the next step (the watched set shrank).
      const overdue = readAt + this.#periodMs - this.#tickMs <= now && this.#maxPerTick === Infinity
      if (picked.length >= Math.floor(this.#credit) && !overdue) break
      if (watch.refreshing) continue
      picked.push(watch)
    }
    if (picked.length === 0) return
    this.#credit = Math.max(0, this.#credit - picked.length)
    this.#stepping = true
    try {
      // Read or not, they go to the back: a failed read is owed and retried by convergence.
      for (const watch of picked) this.read(watch)
      await this.#rereads.reread(picked, 'sweep')
    } finally {
      this.#stepping = false
    }
  }
}
