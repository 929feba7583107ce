import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import { eta, isFinal, isNewer, parseProgress, type JobEvent } from './events'
import { QueueUnavailableError } from './errors'
import type { Keys } from './keys'
import { whenReady } from './redis'
import { readSnapshots, type Snapshot, type SnapshotTarget } from './snapshot'

/** How long a socket may wait for the subscriber connection to come back. */
const SUBSCRIBER_WAIT_MS = 2_500

/** Receives a job's events; a protocol connection holds one per subscribed job. */
export interface Sink {
  deliver: (event: JobEvent) => void
}

/** The message the bridge publishes on a job's channel. */
export interface RelayMessage {
  /** BullMQ's event name (`progress`, `active`, `completed` ...) or `cancelled`. */
  e: string
  /** Milliseconds, when the event happened. */
  t: number
  /** The progress value, on `progress`. */
  d?: unknown
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
  /** Progress that arrived between SUBSCRIBE and the first snapshot. */
  early: RelayMessage | null = null
  ready: Promise<Snapshot | null> | null = null
  refreshing = false
  refreshAgain: string | null = null

  constructor (channel: string, target: SnapshotTarget) {
    this.channel = channel
    this.target = target
  }
}

export interface HubOptions {
  /** Commands (snapshots). */
  redis: Redis
  /** A connection used for SUBSCRIBE only. */
  subscriber: Redis
  keys: Keys
  throttleMs: number
  reconcileIntervalMs: number
  log: FastifyBaseLogger
}

/** What {@link Hub.open} hands back: the job as it is now, and a way to attach or let go. */
export interface OpenedJob {
  snapshot: Snapshot
  attach: (sink: Sink) => void
  detach: (sink: Sink) => void
}

/**
 * The fan-out of one instance: ONE subscriber connection, a channel subscribed while at least one
 * local socket watches its job, and a slow reconcile that re-reads watched jobs so every watcher
 * reaches the final state even when a pub/sub message is lost.
 */
export class Hub {
  readonly #opts: HubOptions
  readonly #watches = new Map<string, Watch>()
  readonly #reconcile: NodeJS.Timeout
  #closed = false

  constructor (opts: HubOptions) {
    this.#opts = opts
    opts.subscriber.on('message', (channel: string, message: string) => this.#onMessage(channel, message))
    // After a reconnect ioredis subscribes again, but what was published meanwhile is gone.
    opts.subscriber.on('ready', () => { void this.reconcile() })
    this.#reconcile = setInterval(() => { void this.reconcile() }, opts.reconcileIntervalMs).unref()
  }

  /** Jobs watched on this instance (for tests and metrics). */
  get watchedCount (): number {
    return this.#watches.size
  }

  /**
   * Subscribes to the job's channel (first watcher only), then reads its snapshot, so no event
   * falls between the two. Null when the job does not exist. The caller checks ownership on the
   * snapshot before it attaches anything.
   */
  async open (target: SnapshotTarget): Promise<OpenedJob | null> {
    if (this.#closed) throw new Error('closed')
    const channel = this.#opts.keys.channel(target.queue, target.jobId)
    let watch = this.#watches.get(channel)
    if (watch === undefined) {
      watch = new Watch(channel, target)
      this.#watches.set(channel, watch)
    }
    watch.opening++
    let snapshot: Snapshot | null
    try {
      watch.ready ??= this.#first(watch)
      snapshot = await watch.ready
    } catch (err) {
      watch.ready = null
      watch.opening--
      this.#drop(watch)
      throw err
    }
    if (snapshot === null) {
      watch.opening--
      this.#drop(watch)
      return null
    }
    const w = watch
    let attached = false
    return {
      snapshot: { ...snapshot, event: w.last ?? snapshot.event },
      attach: (sink) => {
        if (attached) return
        attached = true
        w.opening--
        w.sinks.add(sink)
        if (w.last !== null) sink.deliver(w.last)
      },
      detach: (sink) => {
        if (!attached) {
          attached = true
          w.opening--
        } else {
          w.sinks.delete(sink)
        }
        this.#drop(w)
      }
    }
  }

  async #first (watch: Watch): Promise<Snapshot | null> {
    // Ride out a reconnect in progress (ioredis retries every 2 s at most), but do not queue a
    // SUBSCRIBE behind an outage the client would wait on for ever.
    if (!await whenReady(this.#opts.subscriber, SUBSCRIBER_WAIT_MS)) throw new QueueUnavailableError()
    await this.#opts.subscriber.subscribe(watch.channel)
    const [snapshot] = await readSnapshots(this.#opts.redis, this.#opts.keys, [watch.target], true)
    if (snapshot === null) return null
    this.#apply(watch, snapshot)
    if (watch.early !== null) {
      const early = watch.early
      watch.early = null
      this.#onRelay(watch, early)
    }
    if (watch.refreshAgain !== null) void this.#refresh(watch, watch.refreshAgain)
    return snapshot
  }

  /** Forgets a watch and UNSUBSCRIBEs once no socket holds it or is about to. */
  #drop (watch: Watch): void {
    if (watch.sinks.size > 0 || watch.opening > 0) return
    if (this.#watches.get(watch.channel) !== watch) return
    this.#watches.delete(watch.channel)
    if (watch.timer !== null) clearTimeout(watch.timer)
    if (!this.#closed) {
      this.#opts.subscriber.unsubscribe(watch.channel).catch((err: Error) => this.#opts.log.debug({ err }, 'job-progress: unsubscribe failed'))
    }
  }

  /** Takes a relay message for a channel: from the subscriber, or straight from this instance's bridge. */
  relay (channel: string, raw: string): void {
    if (this.#watches.has(channel)) this.relayedLocally++
    this.#onMessage(channel, raw)
  }

  /** Messages for jobs watched here that this instance's bridge handed over without the trip through Redis. */
  relayedLocally = 0

  #onMessage (channel: string, raw: string): void {
    const watch = this.#watches.get(channel)
    // A message can arrive after its last watcher left; it is nobody's now.
    if (watch === undefined) return
    let message: RelayMessage
    try {
      message = JSON.parse(raw)
    } catch {
      return
    }
    if (watch.last === null) {
      if (message.e === 'progress') watch.early = message
      else watch.refreshAgain = message.e
      return
    }
    this.#onRelay(watch, message)
  }

  #onRelay (watch: Watch, message: RelayMessage): void {
    const last = watch.last
    if (last === null || isFinal(last.state)) return
    if (message.e !== 'progress') {
      void this.#refresh(watch, message.e)
      return
    }
    const { processed, total, attempt } = parseProgress(message.d)
    const ts = typeof message.t === 'number' ? message.t : Date.now()
    this.#offer(watch, {
      kind: watch.target.kind,
      jobId: watch.target.jobId,
      state: 'active',
      processed,
      total,
      // A report that names its attempt orders itself: a retry's first reports replace the
      // failed attempt's higher count instead of being dropped as going back.
      attempt: attempt ?? last.attempt,
      etaSeconds: eta('active', processed, total, watch.startedAt, ts),
      ts
    })
  }

  /** Re-reads a job after a lifecycle event the relay does not carry in full (completed, failed, stalled ...). */
  async #refresh (watch: Watch, hint: string): Promise<void> {
    if (watch.refreshing) {
      watch.refreshAgain = hint
      return
    }
    watch.refreshing = true
    try {
      let next: string | null = hint
      while (next !== null && this.#watches.get(watch.channel) === watch) {
        watch.refreshAgain = null
        const [snapshot] = await readSnapshots(this.#opts.redis, this.#opts.keys, [watch.target], false)
        this.#applyOrGone(watch, snapshot, next)
        next = watch.refreshAgain
      }
    } catch (err) {
      this.#opts.log.debug({ err }, 'job-progress: refresh failed; the reconcile will retry')
    } finally {
      watch.refreshing = false
    }
  }

  #applyOrGone (watch: Watch, snapshot: Snapshot | null, hint: string): void {
    if (snapshot !== null) {
      this.#apply(watch, snapshot)
      return
    }
    // The job hash is gone. Right after `completed`/`failed` that is removeOnComplete/Fail at work;
    // otherwise somebody removed the job: its watchers must not wait for it forever.
    const last = watch.last
    if (last === null) return
    const state = hint === 'completed' ? 'completed' : hint === 'failed' ? 'failed' : 'cancelled'
    this.#offer(watch, {
      ...last,
      state,
      processed: state === 'completed' && last.total > 0 ? last.total : last.processed,
      etaSeconds: state === 'completed' ? 0 : null,
      ...(state === 'completed' ? { result: null } : { error: state === 'failed' ? 'failed' : 'job was removed' }),
      ts: Date.now()
    })
  }

  #apply (watch: Watch, snapshot: Snapshot): void {
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
    for (const sink of watch.sinks) sink.deliver(event)
  }

  /** One pipelined read of every watched job that has not ended; closes any gap the relay left. */
  async reconcile (): Promise<void> {
    const watches = [...this.#watches.values()].filter(w => w.last !== null && !isFinal(w.last.state) && !w.refreshing)
    if (watches.length === 0 || this.#closed || this.#opts.redis.status !== 'ready') return
    try {
      const snapshots = await readSnapshots(this.#opts.redis, this.#opts.keys, watches.map(w => w.target), false)
      watches.forEach((watch, i) => this.#applyOrGone(watch, snapshots[i], 'reconcile'))
    } catch (err) {
      this.#opts.log.debug({ err }, 'job-progress: reconcile failed; will retry')
    }
  }

  /** Stops timers and forgets every watch; the caller closes the connections. */
  close (): void {
    this.#closed = true
    clearInterval(this.#reconcile)
    for (const watch of this.#watches.values()) {
      if (watch.timer !== null) clearTimeout(watch.timer)
    }
    this.#watches.clear()
  }
}
