import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import { eta, isFinal, isNewer, parseProgress, type JobEvent } from '../core/event'
import { progressDetails, type Clipped } from '../core/progress-details'
import { QueueUnavailableError } from '../errors'
import type { Keys } from '../core/keys'
import type { Broker } from '../broker/broker'
import { RedisBroker } from '../broker/classic'
import { whenReady } from '../core/redis-ready'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import { readOpens, readSnapshots, type Commands, type Snapshot, type SnapshotTarget } from '../core/snapshot'
import { JOB_LOST, LOG_PREFIX, parseRelay, relayEntryId, RESYNC, type RelayMessage } from '../wire/relay'
import { compareEntryIds, formatVersion, NO_ENTRY } from '../wire/version'

export type { RelayMessage } from '../wire/relay'

/** How long a socket may wait for the subscriber connection to come back. */
const SUBSCRIBER_WAIT_MS = 2_500
/** How long a recovery waits for its re-subscription before it re-reads anyway. */
const RECOVER_WAIT_MS = 1_000
/** How long a re-read after a fault waits for the command connection, and how often it tries. */
const RECOVER_READY_MS = 10_000
const RECOVER_TRIES = 5
/** Most jobs one pipelined read or one SUBSCRIBE carries in a storm. */
const BATCH = 500

/** Receives a job's events; a protocol connection holds one per subscribed job. */
export interface Sink {
  deliver: (event: JobEvent) => void
}

class Watch {
  readonly channel: string
  readonly target: SnapshotTarget
  readonly sinks = new Set<Sink>()
  /** Opens in flight: a watch is kept while somebody is still deciding to attach. */
  opening = 0
  startedAt: number | null = null
  last: JobEvent | null = null
  emitted: JobEvent | null = null
  lastEmitAt = 0
  timer: NodeJS.Timeout | null = null
  /** The newest stream entry this watch's state reflects: older relay messages are stale. */
  entry = NO_ENTRY
  /** Progress that arrived between SUBSCRIBE and the first snapshot. */
  early: RelayMessage | null = null
  refreshing = false
  refreshAgain: string | null = null
  /** Whether an over-limit report of this job was logged already. */
  clipLogged = false

  constructor (channel: string, target: SnapshotTarget) {
    this.channel = channel
    this.target = target
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
   * The safety sweep's budget: at most this many watched jobs re-read per second by this
   * instance, whatever the number watched; 0 turns it off. Faults are detected and repaired
   * without it; the sweep only bounds how long an undetected loss could last.
   * @defaultValue 0.2
   */
  sweepReadsPerSecond?: number
  /** @deprecated ignored: convergence is paid per event and per fault, not on a timer. */
  reconcileIntervalMs?: number
  telemetry?: Telemetry
  log: FastifyBaseLogger
}

/** What {@link Hub.open} hands back: the job as it is now, and a way to attach or let go. */
export interface OpenedJob {
  snapshot: Snapshot
  attach: (sink: Sink) => void
  detach: (sink: Sink) => void
}

/**
 * A job opened for one watcher: a plain object with methods, not closures, as a storm makes one
 * per subscription and keeps it as long as the subscription lasts.
 */
class Opened implements OpenedJob {
  readonly #watch: Watch
  readonly #owner: string | null
  readonly #startedAt: number | null
  readonly #entryId: string
  /** The read's state, kept only when the watch has none (the watch's is newer and shared). */
  readonly #event: JobEvent | null
  readonly #drop: (watch: Watch) => void
  #attached = false

  constructor (watch: Watch, read: Snapshot, drop: (watch: Watch) => void) {
    // Not the read itself: a finished job's result is in it, and a subscription lives long.
    this.#watch = watch
    this.#owner = read.owner
    this.#startedAt = read.startedAt
    this.#entryId = read.entryId
    this.#event = watch.last === null ? read.event : null
    this.#drop = drop
  }

  /** As read, with the newest state the watch has now. */
  get snapshot (): Snapshot {
    return { event: this.#watch.last ?? this.#event as JobEvent, owner: this.#owner, startedAt: this.#startedAt, data: null, entryId: this.#entryId }
  }

  attach (sink: Sink): void {
    if (this.#attached) return
    this.#attached = true
    const w = this.#watch
    w.opening--
    w.sinks.add(sink)
    if (w.last !== null) sink.deliver(w.last)
  }

  detach (sink: Sink): void {
    const w = this.#watch
    if (!this.#attached) {
      this.#attached = true
      w.opening--
    } else {
      w.sinks.delete(sink)
    }
    this.#drop(w)
  }
}

/**
 * Gathers calls made in one turn of the event loop into one batch, up to {@link BATCH} each. Kept
 * in parallel arrays: a storm pays one promise per call and nothing else.
 */
class Batcher<T, X, R> {
  #items: T[] = []
  #extras: X[] = []
  #resolves: Array<(r: R) => void> = []
  #rejects: Array<(e: unknown) => void> = []
  readonly #run: (items: T[], extras: X[]) => Promise<R[]>
  readonly #flushNow = (): void => this.#flush()

  constructor (run: (items: T[], extras: X[]) => Promise<R[]>) {
    this.#run = run
  }

  async add (item: T, extra: X): Promise<R> {
    return await new Promise<R>((resolve, reject) => {
      if (this.#items.length === 0) setImmediate(this.#flushNow)
      this.#items.push(item)
      this.#extras.push(extra)
      this.#resolves.push(resolve)
      this.#rejects.push(reject)
    })
  }

  #flush (): void {
    const items = this.#items
    const extras = this.#extras
    const resolves = this.#resolves
    const rejects = this.#rejects
    this.#items = []
    this.#extras = []
    this.#resolves = []
    this.#rejects = []
    for (let i = 0; i < items.length; i += BATCH) {
      const end = Math.min(items.length, i + BATCH)
      const run = i === 0 && end === items.length ? this.#run(items, extras) : this.#run(items.slice(i, end), extras.slice(i, end))
      run.then(
        results => { for (let j = i; j < end; j++) resolves[j](results[j - i]) },
        err => { for (let j = i; j < end; j++) rejects[j](err) }
      )
    }
  }
}

/**
 * The fan-out of one instance: ONE subscriber connection, a channel subscribed while at least one
 * local socket watches its job. Convergence is paid per event and per fault: a lifecycle event
 * re-reads its job; a subscriber reconnect re-reads every job watched here; a control message
 * from the bridge (its stream was trimmed past it, or Redis came back empty) re-reads that
 * queue's jobs. A sweep with a fixed budget of reads per second bounds anything else.
 */
export class Hub {
  readonly #opts: HubOptions
  readonly #t: Telemetry
  readonly #broker: Broker
  readonly #watches = new Map<string, Watch>()
  readonly #sweep: NodeJS.Timeout | null
  #sweepQueue: Watch[] = []
  #credit = 0
  #closed = false
  /**
   * Opens of one turn of the event loop: one SUBSCRIBE for their channels, confirmed, then one
   * pipelined read (each job's owner checked first, in the same script as its snapshot). A
   * channel watched here already is subscribed again with the rest (Redis takes it as a no-op),
   * so a job watched here costs what any other costs, and answers no sooner.
   */
  readonly #opens = new Batcher<Watch, string | undefined, Snapshot | null | Error>(async (watches, owners) => {
    // Ride out a reconnect in progress (ioredis retries every 2 s at most), but do not queue a
    // SUBSCRIBE behind an outage the client would wait on for ever.
    if (!await this.#broker.ready(SUBSCRIBER_WAIT_MS)) throw new QueueUnavailableError()
    const channels = new Set<string>()
    for (const watch of watches) channels.add(watch.channel)
    await this.#broker.subscribe([...channels])
    this.#t.count('redisCommands', { op: 'subscribe' })
    // One read per job and expected owner: many sockets opening one job in one turn (tabs on a
    // finished job) share it, instead of one script reading its result once per socket.
    const at = new Map<string, number>()
    const which: number[] = []
    const targets: SnapshotTarget[] = []
    const expected: Array<string | undefined> = []
    for (let i = 0; i < watches.length; i++) {
      const key = owners[i] === undefined ? watches[i].channel : `${watches[i].channel}\u0000${owners[i] as string}`
      let k = at.get(key)
      if (k === undefined) {
        k = targets.length
        at.set(key, k)
        targets.push(watches[i].target)
        expected.push(owners[i])
      }
      which.push(k)
    }
    this.#t.count('snapshotReads', { reason: 'open' }, targets.length)
    this.#t.count('redisCommands', { op: 'snapshot' }, targets.length)
    const reads = await readOpens(this.#opts.redis, this.#opts.keys, targets, expected)
    return which.map(k => reads[k])
  })

  constructor (opts: HubOptions) {
    this.#opts = opts
    this.#t = opts.telemetry ?? noTelemetry
    if (opts.broker === undefined && opts.subscriber === undefined) throw new TypeError('Hub needs a broker or a subscriber connection')
    this.#broker = opts.broker ?? new RedisBroker(opts.redis as Redis, opts.subscriber as Redis)
    this.#broker.onMessage((channel, message) => this.#onMessage(channel, message))
    // After a reconnect the subscriptions are made again, but what was published meanwhile is gone.
    this.#broker.onRecover(() => { void this.#recover() })
    const budget = opts.sweepReadsPerSecond ?? 0.2
    this.#sweep = budget > 0 ? setInterval(() => { void this.#sweepStep(budget) }, 1_000).unref() : null
    this.#t.gauge('watchedJobs', () => this.#watches.size)
  }

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
    if (this.#closed) throw new Error('closed')
    // An expected owner of null is nobody: the script refuses an empty owner like any other.
    const owner = expectedOwner === null ? '' : expectedOwner
    const channel = this.#opts.keys.channel(target.queue, target.jobId)
    let watch = this.#watches.get(channel)
    if (watch === undefined) {
      watch = new Watch(channel, target)
      this.#watches.set(channel, watch)
    }
    watch.opening++
    let snapshot: Snapshot | null | Error
    try {
      snapshot = await this.#opens.add(watch, owner)
    } catch (err) {
      snapshot = err instanceof Error ? err : new Error(String(err))
    }
    if (snapshot === null || snapshot instanceof Error) {
      watch.opening--
      this.#drop(watch)
      if (snapshot === null) return null
      throw snapshot
    }
    this.#first(watch, snapshot)
    return new Opened(watch, snapshot, this.#let)
  }

  /** How an opened job lets go of its watch: one function for every opener, not one each. */
  readonly #let = (watch: Watch): void => this.#drop(watch)

  /** Applies an opener's read; the first one also applies what arrived while it was in flight. */
  #first (watch: Watch, snapshot: Snapshot): void {
    const first = watch.last === null
    this.#apply(watch, snapshot)
    if (!first) return
    if (watch.early !== null) {
      const early = watch.early
      watch.early = null
      this.#onRelay(watch, early)
    }
    if (watch.refreshAgain !== null) void this.#refresh(watch, watch.refreshAgain)
  }

  /** Forgets a watch and UNSUBSCRIBEs once no socket holds it or is about to. */
  #drop (watch: Watch): void {
    if (watch.sinks.size > 0 || watch.opening > 0) return
    if (this.#watches.get(watch.channel) !== watch) return
    this.#watches.delete(watch.channel)
    if (watch.timer !== null) clearTimeout(watch.timer)
    if (!this.#closed) {
      this.#broker.unsubscribe([watch.channel]).catch((err: Error) => this.#opts.log.debug({ err }, 'job-progress: unsubscribe failed'))
    }
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
    if (raw.startsWith(LOG_PREFIX)) return
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
      void this.#refresh(watch, 'lost', message.c ?? RESYNC)
      return
    }
    if (message.e !== 'progress') {
      void this.#refresh(watch, message.e)
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
    if (message.i !== undefined) watch.entry = message.i
    // A report that names its attempt orders itself: a retry's first reports replace the
    // failed attempt's higher count instead of being dropped as going back.
    const at = attempt ?? last.attempt
    if (Number.isFinite(ts)) this.#t.observe('relayLatency', Math.max(0, Date.now() - ts) / 1000)
    this.#offer(watch, {
      kind: watch.target.kind,
      jobId: watch.target.jobId,
      state: 'active',
      processed,
      total,
      attempt: at,
      etaSeconds: eta('active', processed, total, watch.startedAt, ts),
      ts,
      version: formatVersion(at, watch.entry),
      ...details
    })
  }

  /**
   * After the subscriptions were lost: subscribe every watched channel again ourselves (a no-op
   * where the client library already did), so the subscriptions are in effect before the
   * re-read, whatever order the library re-sends them in; then re-read every watched job.
   */
  async #recover (): Promise<void> {
    const channels = [...this.#watches.keys()]
    const subscribed = (async () => {
      for (let i = 0; i < channels.length; i += BATCH) await this.#broker.subscribe(channels.slice(i, i + BATCH), true)
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
    await this.#resync([...this.#watches.values()], 'reconnect')
    if (!confirmed) subscribed.then(async () => await this.#resync([...this.#watches.values()], 'reconnect'), () => {})
  }

  /**
   * Re-reads the watches a fault could have touched, in pipelined batches: the cost is paid once
   * per fault, in proportion to what the fault could have hidden.
   */
  async #resync (watches: Watch[], cause: string): Promise<void> {
    const open = watches.filter(w => w.last !== null && !isFinal(w.last.state))
    this.#t.count('faults', { cause })
    if (open.length === 0 || this.#closed) return
    for (let i = 0; i < open.length; i += BATCH) {
      await this.#reread(open.slice(i, i + BATCH), cause)
    }
  }

  async #reread (watches: Watch[], cause: string, tries = 1): Promise<void> {
    // The subscriber can be back before the command connection is: wait for it, then read.
    if (this.#opts.redis.status !== 'ready') await whenReady(this.#opts.redis as Redis, RECOVER_READY_MS)
    if (this.#closed) return
    try {
      this.#t.count('snapshotReads', { reason: cause }, watches.length)
      this.#t.count('redisCommands', { op: 'snapshot' }, watches.length)
      const snapshots = await readSnapshots(this.#opts.redis, this.#opts.keys, watches.map(w => w.target), false)
      watches.forEach((watch, i) => {
        if (this.#applyOrGone(watch, snapshots[i], 'lost')) this.#t.count('gapsRepaired', { cause })
      })
    } catch (err) {
      // A re-read after a fault must not be lost to a second blip: try again a few times.
      if (cause !== 'sweep' && tries < RECOVER_TRIES && !this.#closed) {
        await new Promise(resolve => setTimeout(resolve, 500 * tries).unref())
        await this.#reread(watches, cause, tries + 1)
        return
      }
      this.#opts.log.debug({ err, cause }, 'job-progress: re-read after a fault failed; the sweep will retry')
    }
  }

  /** The safety sweep: a fixed budget of reads per second, round robin over unfinished watches. */
  async #sweepStep (budget: number): Promise<void> {
    if (this.#closed || this.#opts.redis.status !== 'ready') return
    // A fractional budget accrues: 0.2 is one read every 5 s.
    this.#credit = Math.min(this.#credit + budget, Math.max(1, budget))
    const take = Math.floor(this.#credit)
    if (take === 0) return
    this.#credit -= take
    const picked: Watch[] = []
    while (picked.length < take) {
      if (this.#sweepQueue.length === 0) {
        this.#sweepQueue = [...this.#watches.values()]
        if (this.#sweepQueue.length === 0) break
      }
      const watch = this.#sweepQueue.pop() as Watch
      if (this.#watches.get(watch.channel) === watch && watch.last !== null && !isFinal(watch.last.state) && !watch.refreshing) picked.push(watch)
      if (picked.length + this.#sweepQueue.length === 0) break
    }
    if (picked.length > 0) await this.#reread(picked, 'sweep')
  }

  /** Re-reads a job after a lifecycle event the relay does not carry in full (completed, failed, stalled ...). */
  async #refresh (watch: Watch, hint: string, cause?: string): Promise<void> {
    if (watch.refreshing) {
      watch.refreshAgain = hint
      return
    }
    watch.refreshing = true
    try {
      let next: string | null = hint
      while (next !== null && this.#watches.get(watch.channel) === watch) {
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
      this.#apply(watch, snapshot)
      return watch.last !== before
    }
    // The job hash is gone. Right after `completed`/`failed` that is removeOnComplete/Fail at
    // work; after `removed` somebody removed it; found gone on a re-read after a fault, it was
    // lost (Redis came back empty): a failure with a code clients can tell apart.
    const last = watch.last
    if (last === null) return false
    const state = hint === 'completed' ? 'completed' : hint === 'removed' ? 'cancelled' : 'failed'
    const error = hint === 'failed' ? 'failed' : hint === 'removed' ? 'job was removed' : JOB_LOST
    this.#offer(watch, {
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

  #apply (watch: Watch, snapshot: Snapshot): void {
    // A read that left Redis before a newer relayed event arrived must not undo it.
    if (compareEntryIds(snapshot.entryId, watch.entry) < 0 && !isFinal(snapshot.event.state)) return
    watch.entry = snapshot.entryId
    if (snapshot.startedAt !== null) watch.startedAt = snapshot.startedAt
    this.#offer(watch, snapshot.event)
  }

  #offer (watch: Watch, event: JobEvent): void {
    if (!isNewer(event, watch.last)) return
    watch.last = event
    const wait = watch.lastEmitAt + this.#opts.throttleMs - Date.now()
    if (isFinal(event.state) || wait <= 0) {
      this.#flush(watch)
    } else if (watch.timer === null) {
      watch.timer = setTimeout(() => {
        watch.timer = null
        this.#flush(watch)
      }, wait)
    }
  }

  #flush (watch: Watch): void {
    if (watch.timer !== null) {
      clearTimeout(watch.timer)
      watch.timer = null
    }
    const event = watch.last
    if (event === null || event === watch.emitted) return
    watch.emitted = event
    watch.lastEmitAt = Date.now()
    if (watch.sinks.size > 0) this.#t.count('eventsRelayed')
    for (const sink of watch.sinks) sink.deliver(event)
  }

  /**
   * Re-reads every watched job that has not ended, in batches. Kept for callers that want to
   * force convergence (tests, an operator's hook); nothing calls it on a timer.
   */
  async reconcile (): Promise<void> {
    if (this.#closed || this.#opts.redis.status !== 'ready') return
    await this.#resync([...this.#watches.values()].filter(w => !w.refreshing), 'manual')
  }

  /** Stops timers and forgets every watch; the caller closes the connections. */
  close (): void {
    this.#closed = true
    if (this.#sweep !== null) clearInterval(this.#sweep)
    for (const watch of this.#watches.values()) {
      if (watch.timer !== null) clearTimeout(watch.timer)
    }
    this.#watches.clear()
  }
}
