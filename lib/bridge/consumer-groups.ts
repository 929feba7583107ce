import { isCluster } from '../core/redis-client'
import type { BridgeOptions } from './bridge-options'
import type { StreamFloor } from './stream-floor'

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

type Options = Pick<BridgeOptions, 'redis' | 'blocking' | 'broker' | 'group' | 'consumer' | 'ordered' | 'log'>

/**
 * The bridge's consumer groups on each queue's event stream: the group all instances share, and
 * with the ordered relay its wake group; made where missing, and left on close.
 */
export class ConsumerGroups {
  readonly #o: Options
  readonly #gaps: Announcer
  readonly streams: readonly string[]
  /** The highest entry id known per stream, which a stream made again is raised to. */
  readonly floor: StreamFloor
  /** Whether the ordered relay reads (see BridgeOptions.ordered). */
  readonly ordered: boolean
  /** The wake group of the ordered relay: it only signals that entries arrived. */
  readonly wakeGroup: string

  constructor (opts: Options, streams: readonly string[], gaps: Announcer, floor: StreamFloor) {
    this.#o = opts
    this.#gaps = gaps
    this.floor = floor
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
   *
   * Made again, the stream may be new too, and its entry ids below those watchers hold: its last
   * id is raised to the highest this instance knows (StreamFloor) before anything more is relayed,
   * so no entry added from then on sorts below them. An instance that finds the group made by
   * another raises it as well (it may know a higher id), and tells the watchers when it did.
   */
  async ensure (again = false): Promise<void> {
    for (const stream of this.streams) {
      let made = false
      try {
        // MKSTREAM: before the first job ever ran, and so that XSETID finds a stream.
        await this.#o.redis.xgroup('CREATE', stream, this.#o.group, again ? '0' : '$', 'MKSTREAM')
        made = again
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
      if (again) {
        // Logged, not thrown: the group is made, and the watchers must still hear of it; the
        // periodic check raises the stream when it finds it below.
        const raised = await this.floor.raise(this.#o.redis, stream).catch((err: Error) => {
          this.#o.log.warn({ err, stream }, 'job-progress: cannot raise the last id of an event stream made again; the periodic check retries')
          return null
        })
        if (made) await this.#gaps.announce(stream, 'restart')
        else if (raised !== null) await this.#gaps.announce(stream, 'rewind')
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
