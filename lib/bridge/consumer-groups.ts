import { isCluster } from '../core/redis-client'
import type { BridgeOptions } from './bridge-options'

/** One stream entry as XREADGROUP and XAUTOCLAIM return it. */
export type Entry = [id: string, fields: string[]]

/** Most entries one read (or one run of the relay script) takes. */
export const READ_COUNT = 500

/** The queue whose event stream this is (`<prefix>:<queue>:events`). */
export function queueOf (prefix: string, stream: string): string {
  return stream.slice(prefix.length + 1, -':events'.length)
}

/** Who tells every instance to re-read a queue's watched jobs (see GapRecovery). */
export interface Announcer {
  announce: (stream: string, cause: string) => Promise<void>
}

type Options = Pick<BridgeOptions, 'redis' | 'blocking' | 'broker' | 'group' | 'consumer' | 'ordered'>

/**
 * The bridge's consumer groups on each queue's event stream: the group all instances share, and
 * with the ordered relay its wake group; made where missing, and left on close.
 */
export class ConsumerGroups {
  readonly #o: Options
  readonly #gaps: Announcer
  readonly streams: readonly string[]
  /** Whether the ordered relay reads (see BridgeOptions.ordered). */
  readonly ordered: boolean
  /** The wake group of the ordered relay: it only signals that entries arrived. */
  readonly wakeGroup: string

  constructor (opts: Options, streams: readonly string[], gaps: Announcer) {
    this.#o = opts
    this.#gaps = gaps
    this.streams = streams
    const { ordered, broker, blocking } = opts
    this.ordered = ordered !== false && (broker === undefined || broker.publishesAnywhere) && !isCluster(blocking)
    this.wakeGroup = `${opts.group}:wake`
  }

  /**
   * Creates the group where it is missing. At start it begins at the stream's end ('$'); made
   * again after it vanished (Redis came back empty, the queue was obliterated) it begins at the
   * stream's start, so events written since are not skipped, and every instance is told to
   * re-read that queue's watched jobs: what was in flight is gone.
   */
  async ensure (again = false): Promise<void> {
    for (const stream of this.streams) {
      try {
        // MKSTREAM: before the first job ever ran.
        await this.#o.redis.xgroup('CREATE', stream, this.#o.group, again ? '0' : '$', 'MKSTREAM')
        if (again) await this.#gaps.announce(stream, 'restart')
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
      if (!this.ordered) continue
      try {
        await this.#o.redis.xgroup('CREATE', stream, this.wakeGroup, '$', 'MKSTREAM')
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
    }
  }

  /** Leave no dead consumer behind in the group, unless it still holds entries for others to claim. */
  async leave (): Promise<void> {
    for (const stream of this.streams) {
      try {
        const mine = await this.#o.redis.xpending(stream, this.#o.group, '-', '+', 1, this.#o.consumer) as unknown[]
        if (mine.length === 0) await this.#o.redis.xgroup('DELCONSUMER', stream, this.#o.group, this.#o.consumer)
        if (this.ordered) await this.#o.redis.xgroup('DELCONSUMER', stream, this.wakeGroup, this.#o.consumer)
      } catch {}
    }
  }
}
