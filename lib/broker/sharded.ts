import type { Cluster } from 'ioredis'
import { execAll, type Broker, type ScriptRelay } from './broker'
import { slotOf } from '../core/slot'

/** Groups channels by cluster slot: one SSUBSCRIBE (or SPUBLISH pipeline) cannot span slots. */
function bySlot<T> (items: T[], key: (item: T) => string): Map<number, T[]> {
  const out = new Map<number, T[]>()
  for (const item of items) {
    const slot = slotOf(key(item))
    const list = out.get(slot)
    if (list === undefined) out.set(slot, [item])
    else list.push(item)
  }
  return out
}

/**
 * Sharded pub/sub on a Redis Cluster (Redis 7): a message is SPUBLISHed to, and read from, only
 * the shard that owns its channel's slot, not broadcast over the cluster bus to every node. The
 * cluster must be made with `shardedSubscribers: true`; ioredis then keeps one subscriber per
 * master and re-subscribes after a slot refresh, which it signals with `subscribersReady`.
 */
export class ShardedBroker implements Broker {
  readonly kind = 'sharded' as const
  readonly publishesAnywhere = false
  readonly #commands: Cluster
  readonly #subscriber: Cluster

  constructor (commands: Cluster, subscriber: Cluster) {
    this.#commands = commands
    this.#subscriber = subscriber
  }

  /**
   * Channels subscribed here. The cluster client keeps a list per slot to subscribe again after a
   * slot refresh, and appends a channel to it on every SSUBSCRIBE, even one it holds: a channel
   * watched here is not sent again (a refused probe of somebody else's job would grow that list).
   */
  readonly #subscribed = new Set<string>()

  async subscribe (channels: string[], again = false): Promise<void> {
    const fresh = again ? channels : channels.filter(c => !this.#subscribed.has(c))
    if (fresh.length === 0) {
      // As long as a SUBSCRIBE: whether a job is watched here must not show in the answer's time.
      if (channels.length > 0) await this.#commands.ping()
      return
    }
    for (const channel of fresh) this.#subscribed.add(channel)
    try {
      await Promise.all([...bySlot(fresh, c => c).values()].map(async group => await this.#subscriber.ssubscribe(...group)))
    } catch (err) {
      if (!again) for (const channel of fresh) this.#subscribed.delete(channel)
      throw err
    }
  }

  async unsubscribe (channels: string[]): Promise<void> {
    for (const channel of channels) this.#subscribed.delete(channel)
    await Promise.all([...bySlot(channels, c => c).values()].map(async group => await this.#subscriber.sunsubscribe(...group)))
  }

  onMessage (receive: (channel: string, message: string) => void): void {
    this.#subscriber.on('smessage', receive)
  }

  onRecover (recover: () => void): void {
    // A master failed over, a slot moved or a shard subscriber reconnected: ioredis refreshed
    // the slots and subscribed again. Anything published meanwhile is gone.
    // The first signal, at start, finds nothing watched yet: re-reading nothing is free.
    this.#subscriber.on('subscribersReady', recover)
  }

  async ready (ms: number): Promise<boolean> {
    if (this.#subscriber.status === 'ready') return true
    return await new Promise(resolve => {
      const timer = setTimeout(() => { this.#subscriber.off('ready', done); resolve(false) }, ms).unref()
      const done = (): void => { clearTimeout(timer); resolve(true) }
      this.#subscriber.once('ready', done)
    })
  }

  async publish (messages: Array<[string, string]>): Promise<void> {
    if (messages.length === 0) return
    if (messages.length === 1) {
      await this.#commands.spublish(messages[0][0], messages[0][1])
      return
    }
    await Promise.all([...bySlot(messages, m => m[0]).values()].map(async group => {
      const pipe = this.#commands.pipeline()
      for (const [channel, payload] of group) pipe.spublish(channel, payload)
      await execAll(pipe)
    }))
  }

  async channels (pattern: string): Promise<string[]> {
    const nodes = this.#commands.nodes('master')
    const lists = await Promise.all(nodes.map(async node => await node.call('PUBSUB', 'SHARDCHANNELS', pattern) as string[]))
    return [...new Set(lists.flat())]
  }

  keyGroup (key: string): number {
    return slotOf(key)
  }
}

/** Sharded pub/sub: the job's channel is in another slot than its keys, so SPUBLISH after the script. */
export const shardedScriptRelay: ScriptRelay = {
  inScript: false,
  after: async (redis, channel, message) => { await redis.spublish(channel, message) }
}
