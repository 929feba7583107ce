import { noTelemetry, type Labels } from '../core/telemetry'
import { resyncMessage } from '../wire/relay'
import type { BridgeOptions } from './bridge-options'
import { queueOf, type Announcer } from './consumer-groups'
import { FinalRecovery } from './final-recovery'
import type { Running } from './run-state'
import type { StreamFloor } from './stream-floor'

type Options = Pick<BridgeOptions, 'redis' | 'broker' | 'keys' | 'group' | 'local' | 'telemetry' | 'consumer' | 'onEvent' | 'log' | 'recordRetentionMs'>

/**
 * When the bridge cannot tell which events were lost (its group made again, entries trimmed
 * before the group read them), every instance re-reads the watched jobs of that queue, and the
 * final states of the gap are recovered for the lifecycle listeners (FinalRecovery).
 */
export class GapRecovery implements Announcer {
  readonly #o: Options
  readonly #streams: readonly string[]
  /** Per stream: entries trimmed before the group read them, at the last check. */
  readonly #deficit = new Map<string, number>()
  /** Per stream: entries not yet delivered to the group, at the last check. */
  readonly #lag = new Map<string, number>()
  #faults = 0
  readonly finals: FinalRecovery
  readonly #floor: StreamFloor

  constructor (opts: Options, streams: readonly string[], run: Running, floor: StreamFloor) {
    this.#o = opts
    this.#streams = streams
    this.#floor = floor
    this.finals = new FinalRecovery(opts, run, streams.map(s => queueOf(opts.keys.prefix, s)))
  }

  /** Faults this bridge detected and announced (for tests and metrics). */
  get faults (): number {
    return this.#faults
  }

  /** The `bridgeLag` gauge: per queue, entries not yet delivered to the group at the last check. */
  lagByQueue (): Array<[Labels, number]> {
    return [...this.#lag].map(([stream, n]) => [{ queue: queueOf(this.#o.keys.prefix, stream) }, n])
  }

  /**
   * Tells every instance to re-read the watched jobs of a stream's queue: a resync message on
   * each of the queue's channels that somebody watches right now. Listing the channels costs in
   * proportion to them, once per fault; no instance listens to anything while it watches nothing.
   */
  async announce (stream: string, cause: string): Promise<void> {
    this.#faults++
    ;(this.#o.telemetry ?? noTelemetry).count('faults', { cause })
    const { redis, keys } = this.#o
    // Only the instance that made the group again gets here (the others are told BUSYGROUP).
    if (cause === 'restart' && this.finals.enabled) {
      // Logged, not thrown: the group is made already, and the watchers must still hear of it.
      await this.finals.restarted(queueOf(keys.prefix, stream))
        .then(() => this.finals.resume(), (err: Error) => this.#o.log.error({ err }, 'job-progress: cannot record the gap of a group made again; its final states are not recovered'))
    }
    const payload = resyncMessage(cause)
    const pattern = keys.channel(queueOf(keys.prefix, stream), '').slice(0, -2).replace(/[*?[\]\\]/g, '\\$&') + '{*'
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
   * With lifecycle listeners, a third (one script over the queue's gap record) claims the lost
   * window for FinalRecovery, once across the cluster, and tells whether windows wait.
   * The same read tells whether the stream's last id went below the highest this instance knows
   * (restored from an older file, a replica promoted behind, with the group still there): it is
   * raised again (StreamFloor) and the watchers re-read, as when the group is made again.
   * Returns the streams with entries not yet delivered to the group.
   */
  async checkTrim (): Promise<string[]> {
    const { redis, group } = this.#o
    const behind: string[] = []
    let pending = false
    for (const stream of this.#streams) {
      const pipe = redis.pipeline()
      pipe.xinfo('STREAM', stream)
      pipe.xinfo('GROUPS', stream)
      const replies = await pipe.exec()
      if (replies === null || replies[0][0] !== null || replies[1][0] !== null) continue
      const info = pairs(replies[0][1] as unknown[])
      const mine = (replies[1][1] as unknown[][]).map(pairs).find(g => g.name === group)
      // Without the group, the read loop's NOGROUP makes it again and raises the stream there.
      if (mine === undefined) continue
      const last = String(info['last-generated-id'])
      if (this.#floor.behind(stream, last)) {
        if (await this.#floor.raise(redis, stream) !== null) await this.announce(stream, 'rewind')
      } else {
        this.#floor.note(stream, last)
      }
      const lag = Number(mine.lag ?? NaN)
      if (mine.lag !== null && Number.isFinite(lag)) this.#lag.set(stream, lag)
      // Unknown (Redis cannot count it after some trims) counts as behind.
      if (!(lag === 0)) behind.push(stream)
      const read = mine['entries-read'] === null || mine['entries-read'] === undefined ? NaN : Number(mine['entries-read'])
      const deficit = Math.max(0, Number(info['entries-added']) - Number(info.length) - read)
      if (this.finals.enabled) {
        // Trimmed entries are older than the stream's first entry, or than its last id once empty.
        const first = info['first-entry'] as [string, unknown] | null
        const bound = first === null || first === undefined ? String(info['last-generated-id']) : first[0]
        const trimmed = Number(info['entries-added']) - Number(info.length)
        if (await this.finals.checked(queueOf(this.#o.keys.prefix, stream), Number.isFinite(deficit) ? deficit : -1, trimmed, String(mine['last-delivered-id']), bound)) pending = true
      }
      if (!Number.isFinite(deficit)) continue
      const before = this.#deficit.get(stream) ?? 0
      this.#deficit.set(stream, deficit)
      if (deficit > before) await this.announce(stream, 'trim')
    }
    if (pending) this.finals.resume()
    return behind
  }
}

function pairs (row: unknown[]): Record<string, unknown> {
  const out: Record<string, unknown> = {}
  for (let i = 0; i + 1 < row.length; i += 2) out[String(row[i])] = row[i + 1]
  return out
}
