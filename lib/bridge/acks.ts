import type { BridgeOptions } from './bridge-options'

/** Relayed entries are acknowledged together, at most this long after they were relayed ... */
const ACK_DELAY_MS = 100
/** ... or as soon as this many wait. */
const ACK_BATCH = 1_000

type Options = Pick<BridgeOptions, 'redis' | 'group' | 'claimIdleMs' | 'log'>

/**
 * Acknowledges entries a little later, many in one XACK per stream: a read batch under load is
 * a few entries, and an XACK each would cost Redis a command per batch. An instance that dies
 * in between leaves those entries pending: they are claimed and replayed (at least once).
 */
export class Acks {
  readonly #o: Options
  /** Per stream: relayed entries not acknowledged yet. */
  readonly #acks = new Map<string, string[]>()
  #count = 0
  #timer: NodeJS.Timeout | null = null

  constructor (opts: Options) {
    this.#o = opts
  }

  ack (stream: string, ids: string[]): void {
    if (ids.length === 0) return
    const list = this.#acks.get(stream)
    if (list === undefined) this.#acks.set(stream, ids)
    else for (const id of ids) list.push(id)
    this.#count += ids.length
    if (this.#count >= ACK_BATCH) void this.flush()
    else this.#timer ??= setTimeout(() => { void this.flush() }, Math.min(ACK_DELAY_MS, this.#o.claimIdleMs / 4)).unref()
  }

  async flush (): Promise<void> {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
    const acks = [...this.#acks]
    this.#acks.clear()
    this.#count = 0
    const { redis, group } = this.#o
    await Promise.all(acks.map(async ([stream, ids]) => {
      // Not acknowledged: pending until claimed and replayed, which listeners and hubs tolerate.
      await redis.xack(stream, group, ...ids).catch((err: Error) => this.#o.log.debug({ err }, 'job-progress: bridge acknowledgement failed; the entries will be replayed'))
    }))
  }
}
