import type { FastifyBaseLogger } from 'fastify'
import { execAll, isCluster, type Broker } from '../broker/broker'
import { slotOf } from '../core/slot'
import type { Commands } from '../core/snapshot'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import type { Keys } from '../core/keys'
import { FINAL_EVENTS as FINAL, relayMessage, resyncMessage } from '../wire/relay'
import { RELAY_SCRIPT } from './relay-script'

export { relayMessage } from '../wire/relay'

/**
 * One stream entry the bridge relayed, as handed to `onEvent` listeners (upload cleanup,
 * webhooks). The bridge is at-least-once: a listener can see the same `id` twice and must be
 * idempotent on it.
 */
export interface BridgeEvent {
  /** The queue's name. */
  queue: string
  jobId: string
  /** BullMQ's event name (`progress`, `completed`, `failed` ...) or `cancelled`. */
  event: string
  /** The stream entry id: unique per event and ordered within the queue. */
  id: string
  /** Milliseconds since the epoch, from the entry id. */
  t: number
  /** Whether the job ended with this event. */
  final: boolean
  /** The entry's other fields as BullMQ wrote them (`returnvalue`, `failedReason`, `data` ...). */
  fields: Record<string, string>
}

export interface BridgeOptions {
  /** Commands: PUBLISH, XACK, XAUTOCLAIM. */
  redis: Commands
  /** A dedicated connection for the blocking XREADGROUP. */
  blocking: Commands
  /** Where to publish; PUBLISH on `redis` when absent. */
  broker?: Broker
  keys: Keys
  queues: string[]
  group: string
  consumer: string
  blockMs: number
  claimIdleMs: number
  claimIntervalMs: number
  /** A consumer with nothing pending and idle this long is a dead instance's leftover. */
  consumerIdleMs: number
  /**
   * Reads and publishes in one script on Redis (lib/bridge/relay-script.ts), so that every job's messages
   * leave Redis in stream order whatever the number of instances; only on one Redis with classic
   * pub/sub (a cluster's channels live on other shards than the stream). @default true
   */
  ordered?: boolean
  /** Also hands each message this instance publishes from Node to its own subscribers. */
  local?: (channel: string, payload: string) => void
  /**
   * Whether `onEvent` listeners want progress events too; when false the ordered relay
   * acknowledges progress entries in its script and hands back only lifecycle events.
   * @default true
   */
  progressListeners?: boolean
  /**
   * Called with every relayed event once its message was sent, and before its entry is
   * acknowledged (once across the cluster in normal operation, again after a takeover: be
   * idempotent on the entry id). The bridge waits for a returned promise, so keep it short, and
   * return nothing when there is nothing to wait for; errors are logged.
   */
  onEvent?: (event: BridgeEvent) => void | Promise<void>
  telemetry?: Telemetry
  log: FastifyBaseLogger
}

type Entry = [id: string, fields: string[]]

/** The relay script's reply: entries read, messages published, entries handed back. */
type Relayed = [read: number, published: number, back: Entry[]]

interface Batch {
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

/** Settles a wait on a promise whether it resolved or rejected (its failure is kept elsewhere). */
const settled = (): true => true

/** Relayed entries are acknowledged together, at most this long after they were relayed ... */
const ACK_DELAY_MS = 100
/** ... or as soon as this many wait. */
const ACK_BATCH = 1_000

/** How long close() waits for listeners still running before it acknowledges what finished. */
const SETTLE_ON_CLOSE_MS = 5000

/** A read that brings this many entries or more means the stream is busy (see #read). */
const BUSY_BATCH = 4

/** Most entries one read (or one run of the relay script) takes. */
const READ_COUNT = 500

function size (reply: Array<[string, Entry[]]>): number {
  let n = 0
  for (const [, entries] of reply) n += entries.length
  return n
}

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

/**
 * Reads each queue's BullMQ event stream ONCE across the cluster, through a consumer group all
 * instances share, and publishes every relevant event to its job's own channel. An entry is
 * acknowledged only after it was published; entries a dead instance took but never acknowledged
 * are claimed by the others after `claimIdleMs`, so a SIGKILL loses no final state.
 */
export class Bridge {
  readonly #o: BridgeOptions
  readonly #streams: string[]
  #running = false
  #loops: Array<Promise<void>> = []
  /**
   * What close() calls to end the waits in flight, so a loop never waits on a read that cannot
   * end. One callback per wait, dropped when it ends: racing every read against one promise that
   * lives until close() would keep every read's reply (each race adds a reaction to it).
   */
  readonly #waits = new Set<() => void>()
  #claimTimer: NodeJS.Timeout | null = null
  /** Per stream: the relay script's arguments, the same on every run. */
  readonly #relayArgsOf = new Map<string, Array<string | number>>()
  /** Per stream: relayed entries not acknowledged yet (see #ack). */
  readonly #acks = new Map<string, string[]>()
  /** Batches published with a read whose listeners have not all finished: close() waits for them. */
  readonly #settling = new Set<Promise<void>>()
  #ackCount = 0
  #ackTimer: NodeJS.Timeout | null = null
  #lastSweep = Date.now()
  /** Events published since start (for tests and metrics). */
  published = 0
  /** Per stream: entries trimmed before the group read them, at the last check. */
  readonly #deficit = new Map<string, number>()
  /** Per stream: entries not yet delivered to the group, at the last check. */
  readonly #lag = new Map<string, number>()
  /** Faults this bridge detected and announced (for tests and metrics). */
  faults = 0

  constructor (opts: BridgeOptions) {
    this.#o = opts
    this.#streams = opts.queues.map(q => opts.keys.queueKey(q, 'events'))
  }

  async start (): Promise<void> {
    const t = this.#o.telemetry ?? noTelemetry
    t.gauge('bridgeLag', () => [...this.#lag].map(([stream, n]) => [{ queue: this.#queueOf(stream) }, n]))
    this.#running = true
    await this.#ensureGroups().catch((err: Error) => this.#o.log.warn({ err }, 'job-progress: cannot create the bridge consumer group yet; will retry'))
    // One blocking read cannot span cluster slots: one loop per slot (a single one standalone,
    // or with a hash-tagged prefix that puts every queue in one slot).
    const groups = new Map<number, string[]>()
    for (const stream of this.#streams) {
      const slot = this.#o.broker?.kind === 'sharded' ? slotOf(stream) : 0
      groups.set(slot, [...(groups.get(slot) ?? []), stream])
    }
    const ordered = this.#ordered()
    if (ordered) for (const r of [this.#o.blocking, this.#o.redis]) r.defineCommand('jpRelay', { numberOfKeys: 1, lua: RELAY_SCRIPT })
    this.#loops = [...groups.values()].map(async streams => ordered ? await this.#readOrdered(streams) : await this.#read(streams))
    this.#claimTimer = setInterval(() => { void this.#claim() }, this.#o.claimIntervalMs).unref()
  }

  #ordered (): boolean {
    const { ordered, broker, blocking } = this.#o
    return ordered !== false && (broker === undefined || broker.kind === 'classic') && !isCluster(blocking)
  }

  /** The wake group of the ordered relay: it only signals that entries arrived. */
  get #wakeGroup (): string {
    return `${this.#o.group}:wake`
  }

  #queueOf (stream: string): string {
    return stream.slice(this.#o.keys.prefix.length + 1, -':events'.length)
  }

  /**
   * Creates the group where it is missing. At start it begins at the stream's end ('$'); made
   * again after it vanished (Redis came back empty, the queue was obliterated) it begins at the
   * stream's start, so events written since are not skipped, and every instance is told to
   * re-read that queue's watched jobs: what was in flight is gone.
   */
  async #ensureGroups (again = false): Promise<void> {
    for (const stream of this.#streams) {
      try {
        // MKSTREAM: before the first job ever ran.
        await this.#o.redis.xgroup('CREATE', stream, this.#o.group, again ? '0' : '$', 'MKSTREAM')
        if (again) await this.#announce(stream, 'restart')
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
      if (!this.#ordered()) continue
      try {
        await this.#o.redis.xgroup('CREATE', stream, this.#wakeGroup, '$', 'MKSTREAM')
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
    }
  }

  /**
   * Tells every instance to re-read the watched jobs of a stream's queue: a resync message on
   * each of the queue's channels that somebody watches right now. Listing the channels costs in
   * proportion to them, once per fault; no instance listens to anything while it watches nothing.
   */
  async #announce (stream: string, cause: string): Promise<void> {
    this.faults++
    ;(this.#o.telemetry ?? noTelemetry).count('faults', { cause })
    const { redis, keys } = this.#o
    const payload = resyncMessage(cause)
    const pattern = keys.channel(this.#queueOf(stream), '').slice(0, -2).replace(/[*?[\]\\]/g, '\\$&') + '{*'
    const broker = this.#o.broker
    const channels = broker !== undefined ? await broker.channels(pattern) : await redis.call('PUBSUB', 'CHANNELS', pattern) as string[]
    if (channels.length === 0) return
    let sent: Promise<unknown>
    if (broker !== undefined) {
      sent = broker.publish(channels.map(c => [c, payload]))
    } else {
      const pipe = redis.pipeline()
      for (const channel of channels) pipe.publish(channel, payload)
      sent = pipe.exec()
    }
    if (this.#o.local !== undefined) for (const channel of channels) this.#o.local(channel, payload)
    await sent
  }

  /**
   * BullMQ trims its event stream (about 10,000 entries): entries trimmed before the group read
   * them are lost to every watcher. Redis 7 counts the entries ever added to the stream and the
   * entries the group read; entries gone from the stream's head that the group never read show
   * as `added - length - read > 0`, and stay visible after the group skipped past them. When that
   * deficit grows, the queue's watchers re-read. Two O(1) commands per queue per check.
   */
  async #checkTrim (): Promise<string[]> {
    const { redis, group } = this.#o
    const behind: string[] = []
    for (const stream of this.#streams) {
      const pipe = redis.pipeline()
      pipe.xinfo('STREAM', stream)
      pipe.xinfo('GROUPS', stream)
      const replies = await pipe.exec()
      if (replies === null || replies[0][0] !== null || replies[1][0] !== null) continue
      const info = pairs(replies[0][1] as unknown[])
      const mine = (replies[1][1] as unknown[][]).map(pairs).find(g => g.name === group)
      if (mine === undefined) continue
      const lag = Number(mine.lag ?? NaN)
      if (mine.lag !== null && Number.isFinite(lag)) this.#lag.set(stream, lag)
      // Unknown (Redis cannot count it after some trims) counts as behind.
      if (!(lag === 0)) behind.push(stream)
      if (mine['entries-read'] === null || mine['entries-read'] === undefined) continue
      const deficit = Math.max(0, Number(info['entries-added']) - Number(info.length) - Number(mine['entries-read']))
      if (!Number.isFinite(deficit)) continue
      const before = this.#deficit.get(stream) ?? 0
      this.#deficit.set(stream, deficit)
      if (deficit > before) await this.#announce(stream, 'trim')
    }
    return behind
  }

  async #read (streams: string[]): Promise<void> {
    const { blocking, broker } = this.#o
    const args = [...streams, ...streams.map(() => '>')]
    // Classic pub/sub on one Redis: a PUBLISH on any connection reaches every subscriber, so a
    // batch's messages go out in one write with the next read, on the reading connection, in
    // order before it. Sharded pub/sub sends each message to its channel's shard instead.
    // Under load (a read brought several entries) the next read waits for the publishes' reply
    // instead: it then takes what arrived meanwhile at once, and every socket gets those events
    // in one write, not one write each.
    const withRead = (broker === undefined || broker.kind === 'classic') && !isCluster(blocking)
    let batch: Batch | null = null
    let backoff = 100
    while (this.#running) {
      try {
        const published = batch
        batch = null
        let reply: Array<[string, Entry[]]> | null
        if (published === null || published.messages.length === 0) {
          if (published !== null) await this.#settle(published)
          reply = await this.#readAlone(args)
        } else {
          reply = await this.#publishAndRead(published, args)
        }
        backoff = 100
        if (reply === null) continue
        if (withRead && size(reply) < BUSY_BATCH) batch = this.#prepare(reply)
        else await this.#publish(reply)
      } catch (err) {
        if (!this.#running) break
        const message = String((err as Error).message)
        // The stream or group vanished (Redis restarted empty, the queue was obliterated): make it again.
        if (message.includes('NOGROUP')) await this.#ensureGroups(true).catch(() => {})
        else this.#o.log.debug({ err }, 'job-progress: bridge read failed; retrying')
        await new Promise(resolve => setTimeout(resolve, backoff).unref())
        backoff = Math.min(backoff * 2, 2_000)
      }
    }
    // Read just before close(): sent on the command connection, which close() keeps open until
    // the loops ended, rather than left for another instance to claim claimIdleMs later.
    if (batch !== null) await this.#publishBatch(batch).catch(() => {})
  }

  /**
   * The ordered relay's loop: a blocking read of the wake group, which returns when the next entry
   * arrives (at once when a script left entries unread), and behind it, in the same write, the
   * relay script on each stream (it reads, publishes and acknowledges progress in Redis, and hands
   * back the lifecycle entries for the listeners). Redis keeps a blocked client's next commands
   * until the read returns, then runs them at once: an entry is published the moment it arrives,
   * without a round trip through this process, and the wake-up's reply and the scripts' come back
   * in one read. Nothing is published from here, so there is no local hand-off either: this
   * instance's hub gets every message from its subscriber, in the order Redis published them.
   */
  async #readOrdered (streams: string[]): Promise<void> {
    const { blocking, consumer, blockMs } = this.#o
    const wake = this.#wakeGroup
    const wakeArgs = ['GROUP', wake, consumer, 'COUNT', 1, 'NOACK', 'BLOCK', blockMs, 'STREAMS', ...streams, ...streams.map(() => '>')]
    let backoff = 100
    let failures = 0
    // At start and after a failure, entries may wait that no wake-up will announce: the scripts
    // also run before the read.
    let catchUp = true
    // What failed in the current round; its callbacks are made once, not per round.
    let failed: Error | null = null
    const onWakeUpError = (err: Error): void => { failed ??= err }
    const onScript = streams.map(stream => (err: Error | null | undefined, reply: Relayed): void => {
      if (err != null) failed ??= err
      else this.#relayed(stream, reply)
    })
    while (this.#running) {
      try {
        // Plain commands on a corked socket (one write), not a pipeline: see #publishAndRead.
        // Each script's reply is taken as it arrives: the lifecycle entries it handed back reach
        // the listeners at once.
        failed = null
        let last: Promise<unknown> = Promise.resolve()
        const socket = corkOf(blocking)
        try {
          if (catchUp) for (let i = 0; i < streams.length; i++) this.#relayArgs(blocking, streams[i], onScript[i])
          // Its reply says nothing the scripts after it do not: only its failure is kept.
          blocking.call('XREADGROUP', ...wakeArgs).catch(onWakeUpError)
          for (let i = 0; i < streams.length; i++) last = this.#relayArgs(blocking, streams[i], onScript[i])
        } finally {
          socket?.uncork()
        }
        // Replies come in order: every callback has run when the last script's reply is here.
        if (await this.#unlessStopped(last.then(settled, settled)) === null) break
        if (failed !== null) throw failed
        catchUp = false
        backoff = 100
        failures = 0
      } catch (err) {
        if (!this.#running) break
        catchUp = true
        const message = String((err as Error).message)
        if (message.includes('NOGROUP')) {
          await this.#ensureGroups(true).catch(() => {})
        } else if (++failures === 5) {
          // A Redis that refuses the script (an ACL without scripting) would otherwise stop the relay silently.
          this.#o.log.warn({ err }, 'job-progress: the bridge cannot relay events (5 attempts in a row failed); retrying')
        } else {
          this.#o.log.debug({ err }, 'job-progress: bridge relay failed; retrying')
        }
        await new Promise(resolve => setTimeout(resolve, backoff).unref())
        backoff = Math.min(backoff * 2, 2_000)
      }
    }
  }

  /** Sends the relay script's run on one stream (on a connection or in a pipeline); `done` gets its reply. On a connection, returns the command's promise. */
  #relayArgs (pipe: Commands | ReturnType<Commands['pipeline']>, stream: string, done: (err: Error | null | undefined, reply: Relayed) => void): Promise<unknown> {
    let args = this.#relayArgsOf.get(stream)
    if (args === undefined) {
      const { group, consumer, keys } = this.#o
      const all = this.#o.progressListeners !== false && this.#o.onEvent !== undefined ? '1' : '0'
      // A job's channel is <head><jobId><tail>.
      const probe = keys.channel(this.#queueOf(stream), '\u0000')
      const at = probe.indexOf('\u0000')
      args = [stream, group, consumer, READ_COUNT, this.#wakeGroup, probe.slice(0, at), probe.slice(at + 1), all]
      this.#relayArgsOf.set(stream, args)
    }
    return (pipe as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>).jpRelay(...args, done)
  }

  /**
   * Runs the relay script on a stream until it read less than a full batch (at most 20 runs):
   * for the periodic check and close(), on the command connection.
   */
  async #relayNow (stream: string): Promise<void> {
    for (let runs = 0; runs < 20; runs++) {
      const pipe = this.#o.redis.pipeline()
      let reply: Relayed | null = null
      this.#relayArgs(pipe, stream, (err, r) => { if (err == null) reply = r })
      const [[err]] = await pipe.exec() as Array<[Error | null, unknown]>
      if (err !== null) throw err
      if (reply === null) return
      this.#relayed(stream, reply)
      if ((reply as Relayed)[0] < READ_COUNT) return
    }
  }

  /** What one run of the relay script did: the entries it handed back go to the listeners, then are acknowledged. */
  #relayed (stream: string, [, published, back]: Relayed): void {
    this.published += published
    ;(this.#o.telemetry ?? noTelemetry).count('bridgePublished', {}, published)
    if (back.length === 0) return
    const queue = this.#queueOf(stream)
    const batch: Batch = { messages: [], events: [], done: [[stream, back.map(([id]) => id)]], waits: null, failed: null }
    for (const [id, fields] of back) {
      const message = relayMessage(id, fields)
      if (message !== null) batch.events.push(bridgeEvent(queue, id, message.jobId, fields))
    }
    this.#handOff(batch)
    const settled = this.#settle(batch)
    this.#settling.add(settled)
    const forget = (): void => { this.#settling.delete(settled) }
    settled.then(forget, forget)
  }

  /** One blocking read; null when it timed out or close() began. */
  async #readAlone (args: string[]): Promise<Array<[string, Entry[]]> | null> {
    const { blocking, group, consumer, blockMs } = this.#o
    const read = blocking.xreadgroup('GROUP', group, consumer, 'COUNT', READ_COUNT, 'BLOCK', blockMs, 'STREAMS', ...args) as Promise<Array<[string, Entry[]]> | null>
    // A read in flight when Redis dropped is kept for resending; disconnecting the client
    // while it waits to reconnect leaves that read pending for ever. close() races it.
    read.catch(() => {})
    return await this.#unlessStopped(read)
  }

  /** What `promise` settles with, or null once close() began, whichever comes first. */
  async #unlessStopped<T> (promise: Promise<T>): Promise<T | null> {
    if (!this.#running) return null
    return await new Promise<T | null>((resolve, reject) => {
      const stop = (): void => resolve(null)
      this.#waits.add(stop)
      promise.then((value) => {
        this.#waits.delete(stop)
        resolve(value)
      }, (err) => {
        this.#waits.delete(stop)
        reject(err)
      })
    })
  }

  /**
   * Sends a batch's messages and the next blocking read in one write on the reading connection,
   * hands the batch over locally meanwhile, and acknowledges it once Redis took every message
   * (their replies come before the read's); otherwise its entries stay pending and are claimed
   * and replayed.
   *
   * Plain commands on a corked socket, not an ioredis pipeline: with a pipeline per read, the
   * reads' objects outlived the young generation's collections (about 2 MB promoted per
   * scavenge at 500 reads/s, against some 30 KB without), which made every scavenge several
   * times longer, and those pauses were the tail latency of every socket.
   */
  async #publishAndRead (batch: Batch, args: string[]): Promise<Array<[string, Entry[]]> | null> {
    const { blocking, group, consumer, blockMs } = this.#o
    let published: Promise<unknown>
    let read: Promise<Array<[string, Entry[]]> | null>
    const socket = corkOf(blocking)
    try {
      published = Promise.all(batch.messages.map(async ([channel, payload]) => await blocking.publish(channel, payload)))
      read = blocking.xreadgroup('GROUP', group, consumer, 'COUNT', READ_COUNT, 'BLOCK', blockMs, 'STREAMS', ...args) as Promise<Array<[string, Entry[]]> | null>
    } finally {
      socket?.uncork()
    }
    read.catch(() => {})
    const settled = published.then(async () => { await this.#settle(batch) }, () => {})
    this.#settling.add(settled)
    const forget = (): void => { this.#settling.delete(settled) }
    settled.then(forget, forget)
    this.#handOff(batch)
    const reply = await this.#unlessStopped(read)
    if (reply === null) return null
    await settled
    return reply
  }

  /** Takes over entries another consumer read but did not acknowledge within `claimIdleMs`. */
  async #claim (): Promise<void> {
    if (!this.#running || this.#o.redis.status !== 'ready') return
    const { redis, group, consumer, claimIdleMs } = this.#o
    try {
      for (const stream of this.#streams) {
        let cursor = '0-0'
        do {
          const [next, entries] = await redis.xautoclaim(stream, group, consumer, claimIdleMs, cursor, 'COUNT', 500) as [string, Entry[]]
          if (entries.length > 0) await this.#publish([[stream, entries.filter(e => e !== null && e[1] !== null)]])
          cursor = next
        } while (cursor !== '0-0' && this.#running)
      }
      const behind = await this.#checkTrim()
      // The ordered relay reads when woken; entries whose wake-up a bridge took and then died
      // before reading them are read here, by the same script.
      if (this.#ordered()) {
        for (const stream of behind) await this.#relayNow(stream)
      }
      if (Date.now() - this.#lastSweep > this.#o.consumerIdleMs) await this.#sweepConsumers()
    } catch (err) {
      this.#o.log.debug({ err }, 'job-progress: bridge claim failed; will retry')
    }
  }

  /**
   * An instance that died without closing stays listed in the group. Once its entries have been
   * claimed it holds nothing: drop it. Deleting a live but quiet consumer is harmless too, as its
   * next read makes it again.
   */
  async #sweepConsumers (): Promise<void> {
    this.#lastSweep = Date.now()
    // The wake group's consumers hold nothing (NOACK): each dead instance's leaves once idle.
    const groups = this.#ordered() ? [this.#o.group, this.#wakeGroup] : [this.#o.group]
    for (const stream of this.#streams) {
      for (const group of groups) {
        const consumers = await this.#o.redis.xinfo('CONSUMERS', stream, group) as Array<Array<string | number>>
        for (const row of consumers) {
          const info: Record<string, string | number> = {}
          for (let i = 0; i < row.length; i += 2) info[row[i] as string] = row[i + 1]
          if (info.name !== this.#o.consumer && Number(info.pending) === 0 && Number(info.idle) > this.#o.consumerIdleMs) {
            await this.#o.redis.xgroup('DELCONSUMER', stream, group, String(info.name))
          }
        }
      }
    }
  }

  /** The messages of a read (or claim) batch, and the entries it covers. */
  #prepare (streams: Array<[string, Entry[]]>): Batch {
    const { keys, onEvent } = this.#o
    const batch: Batch = { messages: [], events: [], done: [], waits: null, failed: null }
    for (const [stream, entries] of streams) {
      const queue = this.#queueOf(stream)
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
    this.published += batch.messages.length
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
  #handOff (batch: Batch): void {
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
          // Rejections are taken in #settle; until then, not unhandled.
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
  async #settle (batch: Batch): Promise<void> {
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
    for (const [stream, ids] of batch.done) this.#ack(stream, failed === null ? ids : ids.filter(id => !failed.has(id)))
  }

  /** Publishes entries on their own (claimed entries; sharded pub/sub; under load) and settles them. */
  async #publish (streams: Array<[string, Entry[]]>): Promise<void> {
    await this.#publishBatch(this.#prepare(streams))
  }

  async #publishBatch (batch: Batch): Promise<void> {
    const { redis, broker } = this.#o
    // Sent first, so the other instances are not kept waiting while this one serves its sockets.
    const sent = broker !== undefined ? broker.publish(batch.messages) : publishOn(redis, batch.messages)
    this.#handOff(batch)
    await sent
    await this.#settle(batch)
  }

  /**
   * Acknowledges entries a little later, many in one XACK per stream: a read batch under load is
   * a few entries, and an XACK each would cost Redis a command per batch. An instance that dies
   * in between leaves those entries pending: they are claimed and replayed (at least once).
   */
  #ack (stream: string, ids: string[]): void {
    if (ids.length === 0) return
    const list = this.#acks.get(stream)
    if (list === undefined) this.#acks.set(stream, ids)
    else for (const id of ids) list.push(id)
    this.#ackCount += ids.length
    if (this.#ackCount >= ACK_BATCH) void this.#flushAcks()
    else this.#ackTimer ??= setTimeout(() => { void this.#flushAcks() }, Math.min(ACK_DELAY_MS, this.#o.claimIdleMs / 4)).unref()
  }

  async #flushAcks (): Promise<void> {
    if (this.#ackTimer !== null) clearTimeout(this.#ackTimer)
    this.#ackTimer = null
    const acks = [...this.#acks]
    this.#acks.clear()
    this.#ackCount = 0
    const { redis, group } = this.#o
    await Promise.all(acks.map(async ([stream, ids]) => {
      // Not acknowledged: pending until claimed and replayed, which listeners and hubs tolerate.
      await redis.xack(stream, group, ...ids).catch((err: Error) => this.#o.log.debug({ err }, 'job-progress: bridge acknowledgement failed; the entries will be replayed'))
    }))
  }

  /** Stops reading so other instances take over; acknowledged work is never lost. */
  async close (): Promise<void> {
    this.#running = false
    for (const stop of this.#waits) stop()
    this.#waits.clear()
    if (this.#claimTimer !== null) clearInterval(this.#claimTimer)
    // The blocking read would hold close() for up to blockMs: cut it short.
    this.#o.blocking.disconnect()
    await Promise.all(this.#loops)
    // A wake-up taken just before close would leave its entries to the others' periodic check.
    if (this.#ordered() && this.#o.redis.status === 'ready') {
      for (const stream of this.#streams) await this.#relayNow(stream).catch(() => {})
    }
    // A batch whose listeners are still running (a webhook being queued) is acknowledged with the
    // rest when they finish in time; else it stays pending and another instance replays it.
    if (this.#settling.size > 0) {
      let timer: NodeJS.Timeout | undefined
      await Promise.race([
        Promise.allSettled([...this.#settling]),
        new Promise(resolve => { timer = setTimeout(resolve, SETTLE_ON_CLOSE_MS) })
      ])
      clearTimeout(timer)
    }
    await this.#flushAcks()
    // Leave no dead consumer behind in the group, unless it still holds entries for others to claim.
    for (const stream of this.#streams) {
      try {
        const mine = await this.#o.redis.xpending(stream, this.#o.group, '-', '+', 1, this.#o.consumer) as unknown[]
        if (mine.length === 0) await this.#o.redis.xgroup('DELCONSUMER', stream, this.#o.group, this.#o.consumer)
        if (this.#ordered()) await this.#o.redis.xgroup('DELCONSUMER', stream, this.#wakeGroup, this.#o.consumer)
      } catch {}
    }
  }
}

/**
 * One `onEvent` for several listeners: a promise only when one of them returned one, so an event
 * no listener waits on costs no promise.
 */
export function everyListener (listeners: Array<(event: BridgeEvent) => void | Promise<void>>): (event: BridgeEvent) => void | Promise<void> {
  return (event) => {
    let waits: Array<Promise<void>> | undefined
    for (const listener of listeners) {
      let result: void | Promise<void>
      try {
        result = listener(event)
      } catch (err) {
        // The others still see the event; the entry stays pending all the same.
        result = Promise.reject(err)
      }
      if (result !== undefined) (waits ??= []).push(result)
    }
    if (waits === undefined) return
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => {})
  }
}

/**
 * Corks a connection's socket, so the commands sent until the caller uncorks it leave in one
 * write; null when it has none (not connected: the commands wait in the offline queue).
 */
function corkOf (redis: Commands): { uncork: () => void } | null {
  const socket = (redis as unknown as { stream?: { cork?: () => void, uncork?: () => void } }).stream
  if (typeof socket?.cork !== 'function' || typeof socket.uncork !== 'function') return null
  socket.cork()
  return socket as { uncork: () => void }
}

function bridgeEvent (queue: string, id: string, jobId: string, raw: string[]): BridgeEvent {
  const fields: Record<string, string> = {}
  for (let i = 0; i < raw.length; i += 2) fields[raw[i]] = raw[i + 1]
  const event = fields.event
  return { queue, jobId, event, id, t: Number(id.slice(0, id.indexOf('-'))), final: FINAL.has(event), fields }
}

function pairs (row: unknown[]): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  for (let i = 0; i + 1 < row.length; i += 2) out[String(row[i])] = row[i + 1]
  return out
}
