import type { BatchDelivery } from './batch-delivery'
import type { BridgeOptions } from './bridge-options'
import type { ConsumerGroups, Entry } from './consumer-groups'
import type { GapRecovery } from './gap-recovery'
import type { OrderedRelay } from './ordered-relay'
import type { Running } from './run-state'

type Options = Pick<BridgeOptions, 'redis' | 'group' | 'consumer' | 'claimIdleMs' | 'claimIntervalMs' | 'consumerIdleMs' | 'log'>
type Groups = Pick<ConsumerGroups, 'streams' | 'ordered' | 'wakeGroup'>

/**
 * The bridge's periodic check: takes over what a dead instance read but never acknowledged,
 * looks for entries lost to trimming, reads what the ordered relay was not woken for, and drops
 * the consumers dead instances left in the groups.
 */
export class ConsumerSweep {
  readonly #o: Options
  readonly #run: Running
  readonly #groups: Groups
  readonly #delivery: Pick<BatchDelivery, 'publish'>
  readonly #gaps: Pick<GapRecovery, 'checkTrim'>
  readonly #relay: Pick<OrderedRelay, 'relayNow'>
  #timer: NodeJS.Timeout | null = null
  #lastSweep = Date.now()

  constructor (opts: Options, run: Running, groups: Groups, delivery: Pick<BatchDelivery, 'publish'>, gaps: Pick<GapRecovery, 'checkTrim'>, relay: Pick<OrderedRelay, 'relayNow'>) {
    this.#o = opts
    this.#run = run
    this.#groups = groups
    this.#delivery = delivery
    this.#gaps = gaps
    this.#relay = relay
  }

  start (): void {
    this.#timer = setInterval(() => { void this.#claim() }, this.#o.claimIntervalMs).unref()
  }

  stop (): void {
    if (this.#timer !== null) clearInterval(this.#timer)
  }

  /** Takes over entries another consumer read but did not acknowledge within `claimIdleMs`. */
  async #claim (): Promise<void> {
    if (!this.#run.running || this.#o.redis.status !== 'ready') return
    const { redis, group, consumer, claimIdleMs } = this.#o
    try {
      for (const stream of this.#groups.streams) {
        let cursor = '0-0'
        do {
          const [next, entries] = await redis.xautoclaim(stream, group, consumer, claimIdleMs, cursor, 'COUNT', 500) as [string, Entry[]]
          if (entries.length > 0) await this.#delivery.publish([[stream, entries.filter(e => e !== null && e[1] !== null)]])
          cursor = next
        } while (cursor !== '0-0' && this.#run.running)
      }
      const behind = await this.#gaps.checkTrim()
      // The ordered relay reads when woken; entries whose wake-up a bridge took and then died
      // before reading them are read here, by the same script.
      if (this.#groups.ordered) {
        for (const stream of behind) await this.#relay.relayNow(stream)
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
    const groups = this.#groups.ordered ? [this.#o.group, this.#groups.wakeGroup] : [this.#o.group]
    for (const stream of this.#groups.streams) {
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
}
