import type { FastifyBaseLogger } from 'fastify'
import { isFinal } from '../core/event'
import type { Keys } from '../core/keys'
import type { Broker } from '../broker/broker'
import type { Telemetry } from '../core/telemetry'
import { readSnapshots, type Commands, type Snapshot, type SnapshotTarget } from '../core/snapshot'
import { JOB_LOST } from '../wire/relay'
import { formatVersion } from '../wire/version'
import { BATCH } from './batcher'
import type { Conflation } from './conflation'
import type { Watch } from './watch'
import type { WatchedJobs } from './watches'

/** How long a recovery waits for its re-subscription before it re-reads anyway. */
const RECOVER_WAIT_MS = 1_000
/** A failed re-read is tried again after this, doubled each time up to {@link RETRY_MAX_MS}. */
const RETRY_FIRST_MS = 100
/** The longest wait between two tries of a failed re-read while the command connection is up. */
export const RETRY_MAX_MS = 2_000

export interface ConvergenceOptions {
  redis: Commands
  broker: Broker
  keys: Keys
  telemetry: Telemetry
  log: FastifyBaseLogger
  watches: WatchedJobs
  conflation: Conflation
  /** Told of a job found lost (gone without an end): what it left behind can be removed now. */
  onJobLost?: (target: SnapshotTarget) => void
}

/**
 * The re-reads that bring watchers to the job's true state: after a lifecycle event the relay
 * does not carry in full, after a subscriber reconnect (every watched job), after a control
 * message of the bridge's, and when asked. Each pays in proportion to what it could have hidden.
 */
export class Convergence {
  readonly #opts: ConvergenceOptions
  readonly #t: Telemetry
  readonly #watches: WatchedJobs
  readonly #conflation: Conflation

  constructor (opts: ConvergenceOptions) {
    this.#opts = opts
    this.#t = opts.telemetry
    this.#watches = opts.watches
    this.#conflation = opts.conflation
  }

  /**
   * After the subscriptions were lost: subscribe every watched channel again ourselves (a no-op
   * where the client library already did), so the subscriptions are in effect before the
   * re-read, whatever order the library re-sends them in; then re-read every watched job.
   */
  async recover (): Promise<void> {
    const channels = this.#watches.channels()
    const subscribed = (async () => {
      for (let i = 0; i < channels.length; i += BATCH) await this.#opts.broker.subscribe(channels.slice(i, i + BATCH), true)
    })()
    subscribed.catch((err: Error) => this.#opts.log.debug({ err }, 'job-progress: re-subscribe after a reconnect failed'))
    // A subscribe can be held up behind the library's own re-subscription: re-read at once
    // anyway, and once more when the subscriptions are confirmed, so no publish falls between.
    let timer: NodeJS.Timeout | undefined
    const confirmed = await Promise.race([
      subscribed.then(() => true, () => false),
      new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(false), RECOVER_WAIT_MS).unref() })
    ])
    clearTimeout(timer)
    await this.resync(this.#watches.list(), 'reconnect')
    if (!confirmed) subscribed.then(async () => await this.resync(this.#watches.list(), 'reconnect'), () => {})
  }

  /**
   * Re-reads every watched job that has not ended, in batches. Kept for callers that want to
   * force convergence (tests, an operator's hook); nothing calls it on a timer.
   */
  async reconcile (): Promise<void> {
    if (this.#watches.closed || this.#opts.redis.status !== 'ready') return
    await this.resync(this.#watches.list().filter(w => !w.refreshing), 'manual')
  }

  /**
   * Re-reads the watches a fault could have touched, in pipelined batches: the cost is paid once
   * per fault, in proportion to what the fault could have hidden.
   */
  async resync (watches: Watch[], cause: string): Promise<void> {
    const open = watches.filter(w => w.last !== null && !isFinal(w.last.state))
    this.#t.count('faults', { cause })
    if (open.length === 0 || this.#watches.closed) return
    for (let i = 0; i < open.length; i += BATCH) {
      await this.reread(open.slice(i, i + BATCH), cause)
    }
  }

  /**
   * Reads the watches again in one pipelined round trip and applies what it finds. A read that
   * fails is owed: tried again until it succeeds (see {@link #repay}), whatever the cause, so a
   * final state that a re-read was to bring is never left to the sweep.
   */
  async reread (watches: Watch[], cause: string, hints?: string[]): Promise<boolean> {
    if (this.#watches.closed || watches.length === 0) return true
    try {
      // The command connection has no offline queue: a read sent while it is down fails at once.
      if (this.#opts.redis.status !== 'ready') throw new Error('the command connection is not ready')
      this.#t.count('snapshotReads', { reason: cause }, watches.length)
      this.#t.count('redisCommands', { op: 'snapshot' }, watches.length)
      const snapshots = await readSnapshots(this.#opts.redis, this.#opts.keys, watches.map(w => w.target), false)
      watches.forEach((watch, i) => {
        if (this.#isWatched(watch) && this.#applyOrGone(watch, snapshots[i], hints?.[i] ?? 'lost')) this.#t.count('gapsRepaired', { cause })
      })
      return true
    } catch (err) {
      this.#opts.log.debug({ err, cause }, 'job-progress: a re-read failed; tried again until it succeeds')
      watches.forEach((watch, i) => this.#owe(watch, hints?.[i] ?? 'lost'))
      return false
    }
  }

  /** Re-reads a job after a lifecycle event the relay does not carry in full (completed, failed, stalled ...). */
  async refresh (watch: Watch, hint: string, cause?: string): Promise<void> {
    if (watch.refreshing) {
      watch.refreshAgain = hint
      return
    }
    watch.refreshing = true
    try {
      let next: string | null = hint
      while (next !== null && this.#isWatched(watch)) {
        watch.refreshAgain = null
        if (!await this.reread([watch], cause ?? 'event', [next])) return
        next = watch.refreshAgain
      }
    } finally {
      watch.refreshing = false
    }
  }

  /**
   * A failure of the command connection alone (the subscriber stayed up) loses nothing that was
   * published, only reads: the reads in flight fail and are owed, and so are the ones asked
   * while it is down. When it is back, every owed watch is read.
   */
  commandsReady (): void {
    this.#backoff = RETRY_FIRST_MS
    if (this.#owed.size > 0) this.#schedule(0)
  }

  /** Stops the retries; the watches are forgotten by the caller. */
  close (): void {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
    this.#owed.clear()
  }

  /** Watches whose re-read failed, with the hint for a job found gone: read again until it works. */
  readonly #owed = new Map<Watch, string>()
  #timer: NodeJS.Timeout | null = null
  #backoff = RETRY_FIRST_MS
  #repaying = false

  #isWatched (watch: Watch): boolean {
    return !this.#watches.closed && this.#watches.isWatched(watch)
  }

  #owe (watch: Watch, hint: string): void {
    if (!this.#isWatched(watch)) return
    // A lifecycle hint outranks the generic one: it tells how a job found gone ended.
    if (hint !== 'lost' || !this.#owed.has(watch)) this.#owed.set(watch, hint)
    // While the connection is down its 'ready' brings the retry (commandsReady); up, a backoff.
    if (this.#opts.redis.status === 'ready') this.#schedule(this.#backoff)
  }

  #schedule (ms: number): void {
    if (this.#timer !== null || this.#repaying || this.#watches.closed) return
    this.#timer = setTimeout(() => {
      this.#timer = null
      void this.#repay()
    }, ms).unref()
  }

  /**
   * Reads every owed watch again, in batches; what fails stays owed, tried again after a
   * backoff (100 ms doubling to {@link RETRY_MAX_MS}) or as soon as the connection is ready.
   */
  async #repay (): Promise<void> {
    if (this.#repaying || this.#watches.closed) return
    this.#repaying = true
    let ok = true
    try {
      while (ok && this.#owed.size > 0 && this.#opts.redis.status === 'ready') {
        const batch: Watch[] = []
        const hints: string[] = []
        for (const [watch, hint] of this.#owed) {
          this.#owed.delete(watch)
          if (!this.#isWatched(watch) || (watch.last !== null && isFinal(watch.last.state))) continue
          batch.push(watch)
          hints.push(hint)
          if (batch.length === BATCH) break
        }
        ok = await this.reread(batch, 'retry', hints)
      }
    } finally {
      this.#repaying = false
    }
    if (ok) this.#backoff = RETRY_FIRST_MS
    else this.#backoff = Math.min(this.#backoff * 2, RETRY_MAX_MS)
    if (this.#owed.size > 0 && this.#opts.redis.status === 'ready') this.#schedule(ok ? 0 : this.#backoff)
  }

  /** Applies a re-read; true when it changed what watchers see. */
  #applyOrGone (watch: Watch, snapshot: Snapshot | null, hint: string): boolean {
    if (snapshot !== null) return this.#conflation.apply(watch, snapshot)
    // The job hash is gone. Right after `completed`/`failed` that is removeOnComplete/Fail at
    // work; after `removed` somebody removed it; found gone on a re-read after a fault, it was
    // lost (Redis came back empty): a failure with a code clients can tell apart.
    // Lost, not ended: whatever it left behind (its upload) can go now.
    if (hint !== 'completed' && hint !== 'failed' && hint !== 'removed') this.#opts.onJobLost?.(watch.target)
    const last = watch.last
    if (last === null) return false
    const state = hint === 'completed' ? 'completed' : hint === 'removed' ? 'cancelled' : 'failed'
    const error = hint === 'failed' ? 'failed' : hint === 'removed' ? 'job was removed' : JOB_LOST
    return this.#conflation.offer(watch, {
      ...last,
      state,
      processed: state === 'completed' && last.total > 0 ? last.total : last.processed,
      etaSeconds: state === 'completed' ? 0 : null,
      ...(state === 'completed' ? { result: null } : { error }),
      ts: Date.now(),
      version: formatVersion(last.attempt, watch.entry)
    })
  }
}
