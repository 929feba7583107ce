import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import { eta, isFinal, parseProgress, type JobEvent } from '../core/event'
import { progressDetails, type Clipped } from '../core/progress-details'
import type { Keys } from '../core/keys'
import type { Broker } from '../broker/broker'
import { createBroker } from '../broker/create-broker'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import { noTracing, type Tracing } from '../core/tracing'
import type { Commands, Snapshot, SnapshotTarget } from '../core/snapshot'
import { LOG_PREFIX, parseRelay, relayEntryId, RESYNC, type RelayMessage } from '../wire/relay'
import { STREAM_PREFIX } from '../wire/streams'
import { compareEntryIds, formatVersion, NO_ENTRY } from '../wire/version'
import { Conflation } from './conflation'
import { Convergence } from './convergence'
import type { BatchReceiver } from './batcher'
import { Opened, type OpenedJob } from './opened'
import { Sweep } from './sweep'
import type { Watch } from './watch'
import { Watches } from './watches'

export type { RelayMessage } from '../wire/relay'
export type { OpenedJob } from './opened'
export type { Sink } from './watch'

/** Told the outcome of one {@link Hub.openEach}, once. */
export interface OpenWaiter {
  /** Found at `targets[index]`: attach a sink to it or detach to let go. */
  opened: (index: number, opened: OpenedJob) => void
  /** In none of the places (or not the expected owner's). */
  notFound: () => void
  /** Not found, and a read failed. */
  failed: (err: Error) => void
}

/** What a pending open needs of its hub: the watches, and how a first read is applied. */
interface OpenCore {
  watches: Watches
  first: (watch: Watch, snapshot: Snapshot) => void
}

/**
 * One {@link Hub.openEach} waiting for its batch: its watches and who to tell. Once the reads are
 * back, the first place found is kept and the others let go.
 */
class PendingOpen implements BatchReceiver<Array<Snapshot | null | Error>> {
  readonly #core: OpenCore
  readonly #watches: Watch[]
  readonly #waiter: OpenWaiter
  constructor (core: OpenCore, watches: Watch[], waiter: OpenWaiter) {
    this.#core = core
    this.#watches = watches
    this.#waiter = waiter
  }

  fail (err: unknown): void {
    const error = err instanceof Error ? err : new Error(String(err))
    this.settle(this.#watches.map(() => error))
  }

  settle (reads: Array<Snapshot | null | Error>): void {
    const watches = this.#watches
    const waiter = this.#waiter
    let index = -1
    let failed: Error | null = null
    for (let i = 0; i < watches.length; i++) {
      const read = reads[i]
      if (index < 0 && read !== null && !(read instanceof Error)) {
        index = i
        continue
      }
      if (read instanceof Error) failed ??= read
      this.#core.watches.release(watches[i])
    }
    if (index < 0) return failed !== null ? waiter.failed(failed) : waiter.notFound()
    const watch = watches[index]
    const snapshot = reads[index] as Snapshot
    let opened: Opened
    try {
      this.#core.first(watch, snapshot)
      opened = new Opened(watch, snapshot, this.#core.watches)
    } catch (err) {
      return waiter.failed(err instanceof Error ? err : new Error(String(err)))
    }
    waiter.opened(index, opened)
  }
}

export interface HubOptions {
  /** Commands (snapshots). */
  redis: Commands
  /** A connection used for SUBSCRIBE only (wrapped in a classic broker when `broker` is absent). */
  subscriber?: Redis
  /** The pub/sub to read from; classic on `subscriber` by default. */
  broker?: Broker
  keys: Keys
  throttleMs: number
  /**
   * The safety sweep's coverage period: every unfinished job watched here is re-read at least
   * once per period, the reads spread evenly over it (1 / period reads per second per job); 0
   * turns it off. Faults are detected and repaired without it; the sweep only bounds how long
   * an undetected loss could last.
   * @defaultValue 600_000
   */
  sweepPeriodMs?: number
  /**
   * @deprecated use `sweepPeriodMs`. 0 turns the sweep off; a positive value caps its reads per
   * second on this instance (the period then grows once more than cap × period jobs are watched).
   */
  sweepReadsPerSecond?: number
  /** @deprecated ignored: convergence is paid per event and per fault, not on a timer. */
  reconcileIntervalMs?: number
  telemetry?: Telemetry
  /** Delivery spans of sampled reports (see lib/core/tracing.ts). @defaultValue none */
  tracing?: Tracing
  log: FastifyBaseLogger
  /**
   * Told of each watched job found lost (gone without an end, e.g. Redis came back empty), once
   * per finding; the plugin removes its upload then. The hub knows nothing of uploads.
   */
  onJobLost?: (target: SnapshotTarget) => void
}

/**
 * The fan-out of one instance: ONE subscriber connection, a channel subscribed while at least one
 * local socket watches its job. Convergence is paid per event and per fault: a lifecycle event
 * re-reads its job; a subscriber reconnect re-reads every job watched here; a control message
 * from the bridge (its stream was trimmed past it, or Redis came back empty) re-reads that
 * queue's jobs; a re-read that fails is tried again until it succeeds. A sweep that re-reads every
 * unfinished watched job once per period bounds anything else.
 *
 * The parts, one file each: the refcounted watches (`watches.ts`), what their sinks are offered
 * (`conflation.ts`), the re-reads (`convergence.ts`) and the sweep (`sweep.ts`). The hub itself
 * opens jobs for watchers and turns relay messages into states.
 */
export class Hub {
  readonly #opts: HubOptions
  readonly #t: Telemetry
  readonly #watches: Watches
  readonly #conflation: Conflation
  readonly #convergence: Convergence
  readonly #sweep: Sweep
  readonly #tracing: Tracing

  constructor (opts: HubOptions) {
    this.#opts = opts
    this.#t = opts.telemetry ?? noTelemetry
    if (opts.broker === undefined && opts.subscriber === undefined) throw new TypeError('Hub needs a broker or a subscriber connection')
    const broker = opts.broker ?? createBroker(opts.redis as Redis, opts.subscriber as Redis, 'classic')
    this.#watches = new Watches({ redis: opts.redis, broker, keys: opts.keys, telemetry: this.#t, log: opts.log, onDrop: (watch) => this.#sweep.forget(watch) })
    this.#opening = { watches: this.#watches, first: (watch, snapshot) => this.#first(watch, snapshot) }
    this.#tracing = opts.tracing ?? noTracing
    this.#conflation = new Conflation(opts.throttleMs, this.#t, (watch) => this.#sweep.read(watch), this.#tracing)
    this.#convergence = new Convergence({ redis: opts.redis, broker, keys: opts.keys, telemetry: this.#t, log: opts.log, watches: this.#watches, conflation: this.#conflation, onJobLost: opts.onJobLost })
    broker.onMessage((channel, message) => this.#onMessage(channel, message))
    // After a reconnect the subscriptions are made again, but what was published meanwhile is gone.
    broker.onRecover(() => { void this.#convergence.recover() })
    // The command connection alone can fail (the subscriber stays up): what it lost are reads,
    // owed by convergence and read again once it is back.
    opts.redis.on('ready', this.#onCommandsReady)
    this.#sweep = new Sweep({ periodMs: opts.sweepPeriodMs ?? 600_000, maxReadsPerSecond: opts.sweepReadsPerSecond }, opts.redis, this.#watches, this.#convergence)
    this.#t.gauge('watchedJobs', () => this.#watches.size)
  }

  readonly #onCommandsReady = (): void => this.#convergence.commandsReady()

  /** What a pending open needs of the hub once its reads are back: one object for them all. */
  readonly #opening: OpenCore

  /** Jobs watched on this instance (for tests and metrics). */
  get watchedCount (): number {
    return this.#watches.size
  }

  /**
   * Subscribes to the job's channel, then reads its snapshot, so no event falls between the two.
   * Null when the job does not exist.
   *
   * With `expectedOwner`, the snapshot script checks the owner before it reads anything else: a
   * job of somebody else answers null after the same SUBSCRIBE and the same reads as a job that
   * does not exist, nothing is attached for it, and its channel is let go again (UNSUBSCRIBE,
   * unless somebody here watches it). Without it the caller checks ownership on the snapshot
   * before it attaches anything.
   */
  async open (target: SnapshotTarget, expectedOwner?: string | null): Promise<OpenedJob | null> {
    return (await this.openAny([target], expectedOwner))?.opened ?? null
  }

  /**
   * Opens a job that may be in any of `targets` (a bare job id on several kinds) as one entry of
   * the turn's batch: each channel SUBSCRIBEd, then each place read, in the same two round trips
   * as one target. The first place found is kept and the others let go at once. Null when it is
   * in none of them; throws the first failure when none was found and a read failed.
   */
  async openAny (targets: SnapshotTarget[], expectedOwner?: string | null): Promise<{ index: number, opened: OpenedJob } | null> {
    return await new Promise((resolve, reject) => {
      this.openEach(targets, expectedOwner, { opened: (index, opened) => resolve({ index, opened }), notFound: () => resolve(null), failed: reject })
    })
  }

  /**
   * {@link openAny} without a promise: the outcome is told to `waiter` when the batch's reads
   * come back (at once when the hub is closed). A storm makes one per subscribe; a promise and
   * the async steps around it would each live across the two round trips.
   */
  openEach (targets: SnapshotTarget[], expectedOwner: string | null | undefined, waiter: OpenWaiter): void {
    if (this.#watches.closed) return waiter.failed(new Error('closed'))
    // An expected owner of null is nobody: the script refuses an empty owner like any other.
    const owner = expectedOwner === null ? '' : expectedOwner
    const watches = new Array<Watch>(targets.length)
    for (let i = 0; i < targets.length; i++) watches[i] = this.#watches.acquire(targets[i])
    this.#watches.readInto(watches, owner, new PendingOpen(this.#opening, watches, waiter))
  }

  /** Applies an opener's read; the first one also applies what arrived while it was in flight. */
  #first (watch: Watch, snapshot: Snapshot): void {
    const first = watch.last === null
    this.#conflation.apply(watch, snapshot)
    if (!first) return
    if (watch.early !== null) {
      const early = watch.early
      watch.early = null
      this.#onRelay(watch, early)
    }
    if (watch.refreshAgain !== null) void this.#convergence.refresh(watch, watch.refreshAgain)
  }

  /** Takes a relay message for a channel: from the subscriber, or straight from this instance's bridge. */
  relay (channel: string, raw: string): void {
    const watch = this.#watches.get(channel)
    if (watch === undefined) return
    this.relayedLocally++
    this.#receive(watch, raw)
  }

  /** Messages for jobs watched here that this instance's bridge handed over without the trip through Redis. */
  relayedLocally = 0

  #onMessage (channel: string, raw: string): void {
    // Log lines are the live logs' (lib/channels/logs/live-logs.ts), not a change of state.
    // So are a stream's chunks (lib/channels/streams/).
    if (raw.startsWith(LOG_PREFIX) || raw.startsWith(STREAM_PREFIX)) return
    const watch = this.#watches.get(channel)
    // A message can arrive after its last watcher left; it is nobody's now.
    if (watch !== undefined) this.#receive(watch, raw)
  }

  #receive (watch: Watch, raw: string): void {
    // What the state already reflects (the copy of what this instance's bridge handed over, a
    // message overtaken by a snapshot) is dropped before it is parsed: one parse per event.
    const last = watch.last
    if (last !== null) {
      if (isFinal(last.state)) return
      const id = relayEntryId(raw)
      if (id !== null && compareEntryIds(id, watch.entry) <= 0) return
    }
    const message = parseRelay(raw)
    if (message === null) return
    if (watch.last === null) {
      if (message.e === 'progress') {
        if (watch.early === null || compareEntryIds(message.i ?? NO_ENTRY, watch.early.i ?? NO_ENTRY) >= 0) watch.early = message
      } else {
        watch.refreshAgain = message.e
      }
      return
    }
    this.#onRelay(watch, message)
  }

  #onRelay (watch: Watch, message: RelayMessage): void {
    const last = watch.last
    if (last === null || isFinal(last.state)) return
    // Ordered by version, not by arrival: what the state already reflects is dropped.
    if (message.i !== undefined && compareEntryIds(message.i, watch.entry) <= 0) return
    if (message.e === RESYNC) {
      this.#t.count('faults', { cause: message.c ?? RESYNC })
      void this.#convergence.refresh(watch, 'lost', message.c ?? RESYNC)
      return
    }
    if (message.e !== 'progress') {
      void this.#convergence.refresh(watch, message.e)
      return
    }
    const { processed, total, attempt } = parseProgress(message.d)
    const ts = message.t
    const clipped: Clipped = []
    const details = progressDetails(message.d, clipped)
    if (clipped.length > 0 && !watch.clipLogged) {
      // Once per watched job, not per report: a worker that always sends too much would flood the log.
      watch.clipLogged = true
      this.#opts.log.warn({ jobId: watch.target.jobId, clipped }, 'job-progress: a progress report is over the size limits (stage 64, message 1,024 characters, data 4 KiB as JSON): cut or dropped; the counts went through')
    }
    // The attempt is told, not used to order: the entry id does that (a retry's first reports and
    // a new stage's counts that start again are newer because they came later). The watch's
    // entry id moves only if the conflation takes the state.
    const at = attempt ?? last.attempt
    if (Number.isFinite(ts)) this.#t.observe('relayLatency', Math.max(0, Date.now() - ts) / 1000)
    const event: JobEvent = {
      kind: watch.target.kind,
      jobId: watch.target.jobId,
      state: 'active',
      processed,
      total,
      attempt: at,
      etaSeconds: eta('active', processed, total, watch.startedAt, ts),
      ts,
      // A message without an entry id (an older instance's) has no version: ordered as before.
      ...(message.i !== undefined ? { version: formatVersion(at, message.i) } : {}),
      ...details
    }
    this.#tracing.tag(event, message.d)
    this.#conflation.offer(watch, event)
  }

  /**
   * Re-reads every watched job that has not ended, in batches. Kept for callers that want to
   * force convergence (tests, an operator's hook); nothing calls it on a timer.
   */
  async reconcile (): Promise<void> {
    await this.#convergence.reconcile()
  }

  /** Stops timers and forgets every watch; the caller closes the connections. */
  close (): void {
    this.#sweep.stop()
    this.#convergence.close()
    this.#opts.redis.off('ready', this.#onCommandsReady)
    this.#watches.close()
  }
}
