import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import { isFinal } from '../core/event'
import type { Keys } from '../core/keys'
import type { Broker } from '../broker/broker'
import { whenReady } from '../core/redis-ready'
import type { Telemetry } from '../core/telemetry'
import { readSnapshots, type Commands, type Snapshot } from '../core/snapshot'
import { JOB_LOST } from '../wire/relay'
import { formatVersion } from '../wire/version'
import { BATCH } from './batcher'
import type { Conflation } from './conflation'
import type { Watch } from './watch'
import type { WatchedJobs } from './watches'

/** How long a recovery waits for its re-subscription before it re-reads anyway. */
const RECOVER_WAIT_MS = 1_000
/** How long a re-read after a fault waits for the command connection, and how often it tries. */
const RECOVER_READY_MS = 10_000
const RECOVER_TRIES = 5

export interface ConvergenceOptions {
  redis: Commands
  broker: Broker
  keys: Keys
  telemetry: Telemetry
  log: FastifyBaseLogger
  watches: WatchedJobs
  conflation: Conflation
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

  async reread (watches: Watch[], cause: string, tries = 1): Promise<void> {
    // The subscriber can be back before the command connection is: wait for it, then read.
    if (this.#opts.redis.status !== 'ready') await whenReady(this.#opts.redis as Redis, RECOVER_READY_MS)
    if (this.#watches.closed) return
    try {
      this.#t.count('snapshotReads', { reason: cause }, watches.length)
      this.#t.count('redisCommands', { op: 'snapshot' }, watches.length)
      const snapshots = await readSnapshots(this.#opts.redis, this.#opts.keys, watches.map(w => w.target), false)
      watches.forEach((watch, i) => {
        if (this.#applyOrGone(watch, snapshots[i], 'lost')) this.#t.count('gapsRepaired', { cause })
      })
    } catch (err) {
      // A re-read after a fault must not be lost to a second blip: try again a few times.
      if (cause !== 'sweep' && tries < RECOVER_TRIES && !this.#watches.closed) {
        await new Promise(resolve => setTimeout(resolve, 500 * tries).unref())
        await this.reread(watches, cause, tries + 1)
        return
      }
      this.#opts.log.debug({ err, cause }, 'job-progress: re-read after a fault failed; the sweep will retry')
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
      while (next !== null && this.#watches.isWatched(watch)) {
        watch.refreshAgain = null
        this.#t.count('snapshotReads', { reason: cause ?? 'event' })
        this.#t.count('redisCommands', { op: 'snapshot' })
        const [snapshot] = await readSnapshots(this.#opts.redis, this.#opts.keys, [watch.target], false)
        if (this.#applyOrGone(watch, snapshot, next) && cause !== undefined) this.#t.count('gapsRepaired', { cause })
        next = watch.refreshAgain
      }
    } catch (err) {
      this.#opts.log.debug({ err }, 'job-progress: refresh failed; the next fault re-read or the sweep retries')
    } finally {
      watch.refreshing = false
    }
  }

  /** Applies a re-read; true when it changed what watchers see. */
  #applyOrGone (watch: Watch, snapshot: Snapshot | null, hint: string): boolean {
    const before = watch.last
    if (snapshot !== null) {
      this.#conflation.apply(watch, snapshot)
      return watch.last !== before
    }
    // The job hash is gone. Right after `completed`/`failed` that is removeOnComplete/Fail at
    // work; after `removed` somebody removed it; found gone on a re-read after a fault, it was
    // lost (Redis came back empty): a failure with a code clients can tell apart.
    const last = watch.last
    if (last === null) return false
    const state = hint === 'completed' ? 'completed' : hint === 'removed' ? 'cancelled' : 'failed'
    const error = hint === 'failed' ? 'failed' : hint === 'removed' ? 'job was removed' : JOB_LOST
    this.#conflation.offer(watch, {
      ...last,
      state,
      processed: state === 'completed' && last.total > 0 ? last.total : last.processed,
      etaSeconds: state === 'completed' ? 0 : null,
      ...(state === 'completed' ? { result: null } : { error }),
      ts: Date.now(),
      version: formatVersion(last.attempt, watch.entry)
    })
    return watch.last !== before
  }
}
