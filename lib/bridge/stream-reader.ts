import { isCluster } from '../core/redis-client'
import type { Commands } from '../core/snapshot'
import type { Batch, BatchDelivery } from './batch-delivery'
import type { BridgeOptions } from './bridge-options'
import { READ_COUNT, type ConsumerGroups, type Entry } from './consumer-groups'
import type { Running } from './run-state'

/** A read that brings this many entries or more means the stream is busy (see StreamReader.run). */
const BUSY_BATCH = 4

function size (reply: Array<[string, Entry[]]>): number {
  let n = 0
  for (const [, entries] of reply) n += entries.length
  return n
}

/**
 * Corks a connection's socket, so the commands sent until the caller uncorks it leave in one
 * write; null when it has none (not connected: the commands wait in the offline queue).
 */
export function corkOf (redis: Commands): { uncork: () => void } | null {
  const socket = (redis as unknown as { stream?: { cork?: () => void, uncork?: () => void } }).stream
  if (typeof socket?.cork !== 'function' || typeof socket.uncork !== 'function') return null
  socket.cork()
  return socket as { uncork: () => void }
}

type Options = Pick<BridgeOptions, 'blocking' | 'broker' | 'group' | 'consumer' | 'blockMs' | 'log'>
type Delivery = Pick<BatchDelivery, 'prepare' | 'handOff' | 'settle' | 'track' | 'publish' | 'publishBatch'>

/**
 * The bridge's read loop when it publishes from Node (a cluster, sharded pub/sub, or the ordered
 * relay turned off): a blocking read of the shared consumer group, whose entries go to the
 * batch delivery.
 */
export class StreamReader {
  readonly #o: Options
  readonly #run: Running
  readonly #groups: Pick<ConsumerGroups, 'ensure' | 'floor'>
  readonly #delivery: Delivery

  constructor (opts: Options, run: Running, groups: Pick<ConsumerGroups, 'ensure' | 'floor'>, delivery: Delivery) {
    this.#o = opts
    this.#run = run
    this.#groups = groups
    this.#delivery = delivery
  }

  async run (streams: string[]): Promise<void> {
    const { blocking, broker } = this.#o
    const args = [...streams, ...streams.map(() => '>')]
    // Classic pub/sub on one Redis: a PUBLISH on any connection reaches every subscriber, so a
    // batch's messages go out in one write with the next read, on the reading connection, in
    // order before it. Sharded pub/sub sends each message to its channel's shard instead.
    // Under load (a read brought several entries) the next read waits for the publishes' reply
    // instead: it then takes what arrived meanwhile at once, and every socket gets those events
    // in one write, not one write each.
    const withRead = (broker === undefined || broker.publishesAnywhere) && !isCluster(blocking)
    let batch: Batch | null = null
    let backoff = 100
    while (this.#run.running) {
      try {
        const published = batch
        batch = null
        let reply: Array<[string, Entry[]]> | null
        if (published === null || published.messages.length === 0) {
          if (published !== null) await this.#delivery.settle(published)
          reply = await this.#readAlone(args)
        } else {
          reply = await this.#publishAndRead(published, args)
        }
        backoff = 100
        if (reply === null) continue
        // The highest id read: a stream made again is raised to it (StreamFloor).
        for (const [stream, entries] of reply) if (entries.length > 0) this.#groups.floor.note(stream, entries[entries.length - 1][0])
        if (withRead && size(reply) < BUSY_BATCH) batch = this.#delivery.prepare(reply)
        else await this.#delivery.publish(reply)
      } catch (err) {
        if (!this.#run.running) break
        const message = String((err as Error).message)
        // The stream or group vanished (Redis restarted empty, the queue was obliterated): make it again.
        if (message.includes('NOGROUP')) await this.#groups.ensure(true).catch(() => {})
        else this.#o.log.debug({ err }, 'job-progress: bridge read failed; retrying')
        await new Promise(resolve => setTimeout(resolve, backoff).unref())
        backoff = Math.min(backoff * 2, 2_000)
      }
    }
    // Read just before close(): sent on the command connection, which close() keeps open until
    // the loops ended, rather than left for another instance to claim claimIdleMs later.
    if (batch !== null) await this.#delivery.publishBatch(batch).catch(() => {})
  }

  /** One blocking read; null when it timed out or close() began. */
  async #readAlone (args: string[]): Promise<Array<[string, Entry[]]> | null> {
    const { blocking, group, consumer, blockMs } = this.#o
    const read = blocking.xreadgroup('GROUP', group, consumer, 'COUNT', READ_COUNT, 'BLOCK', blockMs, 'STREAMS', ...args) as Promise<Array<[string, Entry[]]> | null>
    // A read in flight when Redis dropped is kept for resending; disconnecting the client
    // while it waits to reconnect leaves that read pending for ever. close() races it.
    read.catch(() => {})
    return await this.#run.unlessStopped(read)
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
    const settled = published.then(async () => { await this.#delivery.settle(batch) }, () => {})
    this.#delivery.track(settled)
    this.#delivery.handOff(batch)
    const reply = await this.#run.unlessStopped(read)
    if (reply === null) return null
    await settled
    return reply
  }
}
