import type { FastifyBaseLogger } from 'fastify'
import { QueueUnavailableError } from '../errors'
import type { Keys } from '../core/keys'
import type { Broker } from '../broker/broker'
import type { Telemetry } from '../core/telemetry'
import { readOpens, type Commands, type Snapshot, type SnapshotTarget } from '../core/snapshot'
import { BATCH, Batcher, type BatchReceiver } from './batcher'
import { Watch } from './watch'

/** How long a socket may wait for the subscriber connection to come back. */
const SUBSCRIBER_WAIT_MS = 2_500

export interface WatchesOptions {
  redis: Commands
  broker: Broker
  keys: Keys
  telemetry: Telemetry
  log: FastifyBaseLogger
  /** Called when a watch is let go. */
  onDrop?: (watch: Watch) => void
}

/** The watched jobs as convergence and the sweep see them: read only. */
export interface WatchedJobs {
  /** Whether the hub was closed: nothing is read or subscribed any more. */
  readonly closed: boolean
  /** Whether `watch` is still the one watched for its channel. */
  isWatched: (watch: Watch) => boolean
  /** A copy of every watch, in the order watched. */
  list: () => Watch[]
  /** A copy of every watched channel, in the order watched. */
  channels: () => string[]
}

/**
 * The refcounted subscriptions of one instance: a watch per job, its channel SUBSCRIBEd when its
 * first local watcher opens it and UNSUBSCRIBEd when the last one lets go.
 */
export class Watches implements WatchedJobs {
  readonly #opts: WatchesOptions
  readonly #map = new Map<string, Watch>()
  #closed = false
  /**
   * Opens of one turn of the event loop, each the watches of the places one job may be: one
   * SUBSCRIBE for their channels, confirmed, then one pipelined read (each job's owner checked
   * first, in the same script as its snapshot). A channel watched here already is subscribed
   * again with the rest (Redis takes it as a no-op), so a job watched here costs what any other
   * costs, and answers no sooner.
   */
  readonly #opens = new Batcher<Watch[], string | undefined, Array<Snapshot | null | Error>>(async (opens, owners) => {
    const broker = this.#opts.broker
    const t = this.#opts.telemetry
    // Ride out a reconnect in progress (ioredis retries every 2 s at most), but do not queue a
    // SUBSCRIBE behind an outage the client would wait on for ever.
    if (!await broker.ready(SUBSCRIBER_WAIT_MS)) throw new QueueUnavailableError()
    // One read per job and expected owner: many sockets opening one job in one turn (tabs on a
    // finished job) share it, instead of one script reading its result once per socket. The
    // first read of a watch is kept by the watch itself; one asked with another owner is not shared.
    const at = new Map<Watch, number>()
    const channels: string[] = []
    const which: number[] = []
    const targets: SnapshotTarget[] = []
    const expected: Array<string | undefined> = []
    for (let i = 0; i < opens.length; i++) {
      const owner = owners[i]
      for (const watch of opens[i]) {
        let k = at.get(watch)
        if (k === undefined || expected[k] !== owner) {
          if (k === undefined) channels.push(watch.channel)
          k = targets.length
          at.set(watch, k)
          targets.push(watch.target)
          expected.push(owner)
        }
        which.push(k)
      }
    }
    await broker.subscribe(channels)
    t.count('redisCommands', { op: 'subscribe' })
    t.count('snapshotReads', { reason: 'open' }, targets.length)
    t.count('redisCommands', { op: 'snapshot' }, targets.length)
    const reads = await readOpens(this.#opts.redis, this.#opts.keys, targets, expected)
    const out = new Array<Array<Snapshot | null | Error>>(opens.length)
    let n = 0
    for (let i = 0; i < opens.length; i++) {
      const got = new Array<Snapshot | null | Error>(opens[i].length)
      for (let j = 0; j < got.length; j++) got[j] = reads[which[n++]]
      out[i] = got
    }
    return out
  })

  constructor (opts: WatchesOptions) {
    this.#opts = opts
  }

  get size (): number {
    return this.#map.size
  }

  get closed (): boolean {
    return this.#closed
  }

  get (channel: string): Watch | undefined {
    return this.#map.get(channel)
  }

  isWatched (watch: Watch): boolean {
    return this.#map.get(watch.channel) === watch
  }

  list (): Watch[] {
    return [...this.#map.values()]
  }

  channels (): string[] {
    return [...this.#map.keys()]
  }

  /** The job's watch, made if it has none; counted as an open in flight until attached or dropped. */
  acquire (target: SnapshotTarget): Watch {
    const channel = this.#opts.keys.channel(target.queue, target.jobId)
    let watch = this.#map.get(channel)
    if (watch === undefined) {
      watch = new Watch(channel, target)
      this.#map.set(channel, watch)
    }
    watch.opening++
    return watch
  }

  /**
   * Subscribes the channels of the places one job may be, then reads it in each, batched with
   * the other opens of this turn: a read (or its error, or null) per watch, in order, told to
   * `receiver` (no promise: a storm makes one per subscribe).
   */
  readInto (watches: Watch[], owner: string | undefined, receiver: BatchReceiver<Array<Snapshot | null | Error>>): void {
    this.#opens.send(watches, owner, receiver)
  }

  /** An open that attached nothing (the job is not there, or the read failed) lets go of its watch. */
  release (watch: Watch): void {
    watch.opening--
    this.drop(watch)
  }

  /** Forgets a watch and UNSUBSCRIBEs once no socket holds it or is about to. */
  drop (watch: Watch): void {
    if (watch.sinkCount > 0 || watch.opening > 0) return
    if (this.#map.get(watch.channel) !== watch) return
    this.#map.delete(watch.channel)
    this.#opts.onDrop?.(watch)
    if (watch.timer !== null) clearTimeout(watch.timer)
    if (this.#closed) return
    if (this.#leaving.length === 0) setImmediate(this.#unsubscribe)
    this.#leaving.push(watch.channel)
  }

  /** Channels let go in this turn: one UNSUBSCRIBE for them all (a storm's closes are thousands). */
  #leaving: string[] = []

  readonly #unsubscribe = (): void => {
    // A channel watched again since (in the same turn) stays: its SUBSCRIBE is its new watch's.
    const channels = this.#leaving.filter(channel => !this.#map.has(channel))
    this.#leaving = []
    if (this.#closed || channels.length === 0) return
    for (let i = 0; i < channels.length; i += BATCH) {
      this.#opts.broker.unsubscribe(channels.slice(i, i + BATCH)).catch((err: Error) => this.#opts.log.debug({ err }, 'job-progress: unsubscribe failed'))
    }
  }

  /** Stops every watch's timer and forgets them all; nothing is unsubscribed (the caller closes the connection). */
  close (): void {
    this.#closed = true
    for (const watch of this.#map.values()) {
      if (watch.timer !== null) clearTimeout(watch.timer)
    }
    this.#map.clear()
  }
}
