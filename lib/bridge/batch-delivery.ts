import { execAll } from '../broker/broker'
import type { Commands } from '../core/snapshot'
import { noTelemetry } from '../core/telemetry'
import { relayMessage } from '../wire/relay'
import type { Acks } from './acks'
import { bridgeEvent, type BridgeEvent } from './bridge-event'
import type { BridgeOptions } from './bridge-options'
import { queueOf, type Entry } from './consumer-groups'

/** A read (or claim, or relay script) batch on its way: its messages, its events, its entries. */
export interface Batch {
  /** Channel and payload of each relayed entry. */
  messages: Array<[string, string]>
  events: BridgeEvent[]
  /** Per stream: every entry read, relayed or skipped. */
  done: Array<[string, string[]]>
  /** Listeners that returned a promise: the event's index and the promise. */
  waits: Array<[number, PromiseLike<unknown>]> | null
  /** Entries whose listener failed: not acknowledged. */
  failed: Set<string> | null
}

/** How long close() waits for listeners still running before it acknowledges what finished. */
const SETTLE_ON_CLOSE_MS = 5000

/** A failed listener is tried again after this, doubled each time up to {@link RETRY_MAX_MS}. */
const RETRY_FIRST_MS = 100
/** The longest wait between two tries of a failed listener while the command connection is up. */
export const RETRY_MAX_MS = 2_000
/** Most events kept for a retry here; beyond, an entry waits for the claim (claimIdleMs). */
const MAX_OWED = 10_000

/** PUBLISHes on a plain connection: one command alone, several in one pipeline. */
async function publishOn (redis: Commands, messages: Array<[string, string]>): Promise<void> {
  if (messages.length === 1) {
    await redis.publish(messages[0][0], messages[0][1])
  } else if (messages.length > 1) {
    const pipe = redis.pipeline()
    for (const [channel, payload] of messages) pipe.publish(channel, payload)
    await execAll(pipe)
  }
}

type Options = Pick<BridgeOptions, 'redis' | 'broker' | 'keys' | 'local' | 'onEvent' | 'telemetry' | 'log'>

/**
 * What becomes of relayed entries: their messages go to the job's channels and to this
 * instance's own subscribers, their events to the listeners (upload cleanup, webhooks, my jobs),
 * and the entries are acknowledged once those listeners succeeded.
 *
 * A listener that failed (its Redis connection not back yet: after a restart the bridge's own
 * connection often reconnects first) is called again here, as soon as the command connection is
 * ready and then after a backoff of 100 ms doubling to 2 s, until it succeeds; only then is the
 * entry acknowledged. Left to the claim of pending entries, a final would reach webhooks and the
 * feed only `claimIdleMs` (10 s) plus up to `claimIntervalMs` (5 s) later; the claim still covers
 * an instance that dies meanwhile.
 */
export class BatchDelivery {
  readonly #o: Options
  readonly #acks: Pick<Acks, 'ack'>
  /** Batches published with a read whose listeners have not all finished: close() waits for them. */
  readonly #settling = new Set<Promise<void>>()
  #published = 0
  /** Events whose listener failed, by stream and entry id: called again until it succeeds. */
  readonly #owed = new Map<string, [stream: string, event: BridgeEvent]>()
  #retryTimer: NodeJS.Timeout | null = null
  #retryBackoff = RETRY_FIRST_MS
  #retrying = false
  #waitingReady = false
  #closed = false

  constructor (opts: Options, acks: Pick<Acks, 'ack'>) {
    this.#o = opts
    this.#acks = acks
  }

  /** Events published from Node since start (for tests and metrics). */
  get published (): number {
    return this.#published
  }

  /** The messages of a read (or claim) batch, and the entries it covers. */
  prepare (streams: Array<[string, Entry[]]>): Batch {
    const { keys, onEvent } = this.#o
    const batch: Batch = { messages: [], events: [], done: [], waits: null, failed: null }
    for (const [stream, entries] of streams) {
      const queue = queueOf(keys.prefix, stream)
      const ids: string[] = []
      for (const [id, fields] of entries) {
        ids.push(id)
        const message = relayMessage(id, fields)
        if (message !== null) {
          batch.messages.push([keys.channel(queue, message.jobId), message.payload])
          if (onEvent !== undefined) batch.events.push(bridgeEvent(queue, id, message.jobId, fields))
        }
      }
      if (ids.length > 0) batch.done.push([stream, ids])
    }
    this.#published += batch.messages.length
    ;(this.#o.telemetry ?? noTelemetry).count('bridgePublished', {}, batch.messages.length)
    return batch
  }

  /**
   * Once a batch's messages were sent: hands them to this instance's own subscribers, and its
   * events to the listeners (webhooks, upload cleanup). Listeners act before the entries are
   * acknowledged: an instance that dies in between, or a listener that fails (Redis gone for a
   * moment), leaves the entry pending, and it is claimed and replayed after claimIdleMs. Only
   * what a listener returns as a promise is waited for.
   */
  handOff (batch: Batch): void {
    const { local, onEvent } = this.#o
    if (local !== undefined) {
      for (const [channel, payload] of batch.messages) {
        // This instance's sockets failing to take a message (a protocol's render that throws) must
        // not keep the listeners from the event, nor the entry from being acknowledged: a replay
        // would only throw again.
        try {
          local(channel, payload)
        } catch (err) {
          this.#o.log.error({ err, channel }, 'job-progress: delivering a relayed message to this instance\'s sockets failed')
        }
      }
    }
    if (onEvent === undefined) return
    for (let i = 0; i < batch.events.length; i++) {
      try {
        const result = onEvent(batch.events[i])
        if (result !== undefined && typeof result.then === 'function') {
          // Rejections are taken in settle; until then, not unhandled.
          result.then(undefined, () => {})
          ;(batch.waits ??= []).push([i, result])
        }
      } catch (err) {
        this.#failed(batch, batch.events[i], err)
      }
    }
  }

  #failed (batch: Batch, event: BridgeEvent, err: unknown): void {
    (batch.failed ??= new Set()).add(event.id)
    this.#o.log.warn({ err, jobId: event.jobId, event: event.event }, 'job-progress: a bridge event listener failed; the event stays pending for a retry')
  }

  /** After Redis took a batch's messages: acknowledges its entries once their listeners succeeded. */
  async settle (batch: Batch): Promise<void> {
    if (batch.waits !== null) {
      for (const [i, wait] of batch.waits) {
        try {
          await wait
        } catch (err) {
          this.#failed(batch, batch.events[i], err)
        }
      }
    }
    const failed = batch.failed
    for (const [stream, ids] of batch.done) this.#acks.ack(stream, failed === null ? ids : ids.filter(id => !failed.has(id)))
    if (failed !== null) {
      for (const event of batch.events) if (failed.has(event.id)) this.#owe(event)
    }
  }

  /** Events whose listeners failed and are being tried again (for tests). */
  get owed (): number {
    return this.#owed.size
  }

  #owe (event: BridgeEvent): void {
    if (this.#closed || this.#o.onEvent === undefined || this.#owed.size >= MAX_OWED) return
    const stream = this.#o.keys.queueKey(event.queue, 'events')
    this.#owed.set(`${stream}\0${event.id}`, [stream, event])
    this.#scheduleRetry(this.#retryBackoff)
  }

  #scheduleRetry (ms: number): void {
    if (this.#closed || this.#retrying || this.#owed.size === 0) return
    const { redis } = this.#o
    // While the connection is down its 'ready' brings the retry; the timer is the fallback.
    if (redis.status !== 'ready' && !this.#waitingReady) {
      this.#waitingReady = true
      redis.once('ready', () => {
        this.#waitingReady = false
        if (this.#retryTimer !== null) clearTimeout(this.#retryTimer)
        this.#retryTimer = null
        this.#retryBackoff = RETRY_FIRST_MS
        this.#scheduleRetry(0)
      })
    }
    if (this.#retryTimer !== null) return
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null
      void this.#retry()
    }, ms).unref()
  }

  /** Calls the listeners of every owed event again; acknowledges the entries of those that succeed. */
  async #retry (): Promise<void> {
    const { onEvent, redis } = this.#o
    if (this.#closed || this.#retrying || onEvent === undefined) return
    if (redis.status !== 'ready') {
      this.#retryBackoff = Math.min(this.#retryBackoff * 2, RETRY_MAX_MS)
      this.#scheduleRetry(this.#retryBackoff)
      return
    }
    this.#retrying = true
    let ok = true
    try {
      const owed = [...this.#owed]
      const results = await Promise.allSettled(owed.map(async ([, [, event]]) => { await onEvent(event) }))
      const acks = new Map<string, string[]>()
      results.forEach((result, i) => {
        const [key, [stream, event]] = owed[i]
        if (result.status === 'rejected') {
          ok = false
          this.#o.log.debug({ err: result.reason, jobId: event.jobId, event: event.event }, 'job-progress: a bridge event listener failed again; tried again until it succeeds')
          return
        }
        this.#owed.delete(key)
        acks.set(stream, [...(acks.get(stream) ?? []), event.id])
      })
      for (const [stream, ids] of acks) this.#acks.ack(stream, ids)
    } finally {
      this.#retrying = false
    }
    this.#retryBackoff = ok ? RETRY_FIRST_MS : Math.min(this.#retryBackoff * 2, RETRY_MAX_MS)
    this.#scheduleRetry(this.#retryBackoff)
  }

  /** Keeps a batch's settling in view until it ends, for close() to wait on. */
  track (settled: Promise<void>): void {
    this.#settling.add(settled)
    const forget = (): void => { this.#settling.delete(settled) }
    settled.then(forget, forget)
  }

  /**
   * Waits for the batches still settling, at most SETTLE_ON_CLOSE_MS, and stops the retries:
   * entries still owed stay pending for another instance to claim.
   */
  async settleInFlight (): Promise<void> {
    this.#closed = true
    if (this.#retryTimer !== null) clearTimeout(this.#retryTimer)
    this.#retryTimer = null
    this.#owed.clear()
    if (this.#settling.size > 0) {
      let timer: NodeJS.Timeout | undefined
      await Promise.race([
        Promise.allSettled([...this.#settling]),
        new Promise(resolve => { timer = setTimeout(resolve, SETTLE_ON_CLOSE_MS) })
      ])
      clearTimeout(timer)
    }
  }

  /** Publishes entries on their own (claimed entries; sharded pub/sub; under load) and settles them. */
  async publish (streams: Array<[string, Entry[]]>): Promise<void> {
    await this.publishBatch(this.prepare(streams))
  }

  async publishBatch (batch: Batch): Promise<void> {
    const { redis, broker } = this.#o
    // Sent first, so the other instances are not kept waiting while this one serves its sockets.
    const sent = broker !== undefined ? broker.publish(batch.messages) : publishOn(redis, batch.messages)
    this.handOff(batch)
    await sent
    await this.settle(batch)
  }
}
