import type { Redis } from 'ioredis'
import { whenReady } from '../core/redis-ready'
import { execAll, type Broker, type ScriptRelay } from './broker'

/** Classic pub/sub: PUBLISH reaches every node's subscribers, SUBSCRIBE on one connection. */
export class RedisBroker implements Broker {
  readonly kind = 'classic' as const
  readonly publishesAnywhere = true
  readonly #commands: Redis
  readonly #subscriber: Redis
  #wasReady: boolean
  readonly #recovers: Array<() => void> = []

  constructor (commands: Redis, subscriber: Redis) {
    this.#commands = commands
    this.#subscriber = subscriber
    this.#wasReady = subscriber.status === 'ready'
    // Watched from here, not from onRecover: the hub registers only after the plugin awaited its
    // command connection, and a first connect seen by nobody made the first reconnect pass for
    // the first connect, so what it lost was never re-read.
    subscriber.on('ready', () => {
      if (!this.#wasReady) {
        this.#wasReady = true
        return
      }
      // ioredis has re-sent the SUBSCRIBEs; one more round trip on that connection confirms
      // they took effect before the caller re-reads, so nothing falls between the two.
      this.#subscriber.ping().then(() => { for (const recover of this.#recovers) recover() }, () => {})
    })
  }

  async subscribe (channels: string[]): Promise<void> {
    if (channels.length > 0) await this.#subscriber.subscribe(...channels)
  }

  async unsubscribe (channels: string[]): Promise<void> {
    if (channels.length > 0) await this.#subscriber.unsubscribe(...channels)
  }

  onMessage (receive: (channel: string, message: string) => void): void {
    this.#subscriber.on('message', receive)
  }

  onRecover (recover: () => void): void {
    this.#recovers.push(recover)
  }

  async ready (ms: number): Promise<boolean> {
    return await whenReady(this.#subscriber, ms)
  }

  async publish (messages: Array<[string, string]>): Promise<void> {
    if (messages.length === 0) return
    // Under a moderate load a read batch is one event: a pipeline would only add its bookkeeping.
    if (messages.length === 1) {
      await this.#commands.publish(messages[0][0], messages[0][1])
      return
    }
    const pipe = this.#commands.pipeline()
    for (const [channel, payload] of messages) pipe.publish(channel, payload)
    await execAll(pipe)
  }

  async channels (pattern: string): Promise<string[]> {
    return await this.#commands.call('PUBSUB', 'CHANNELS', pattern) as string[]
  }

  keyGroup (_key: string): number {
    return 0
  }
}

/** Classic pub/sub: a script PUBLISHes itself, in the round trip of its write. */
export const classicScriptRelay: ScriptRelay = { inScript: true, after: async () => {} }
