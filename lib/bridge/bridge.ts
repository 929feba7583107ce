import { noTelemetry } from '../core/telemetry'
import { Acks } from './acks'
import { BatchDelivery } from './batch-delivery'
import type { BridgeOptions } from './bridge-options'
import { ConsumerGroups } from './consumer-groups'
import { ConsumerSweep } from './consumer-sweep'
import { GapRecovery } from './gap-recovery'
import { OrderedRelay } from './ordered-relay'
import { RunState } from './run-state'
import { StreamFloor } from './stream-floor'
import { StreamReader } from './stream-reader'

export { relayMessage } from '../wire/relay'
export { everyListener, finalKey, type BridgeEvent } from './bridge-event'
export { recordCreated } from './final-recovery'
export type { BridgeOptions } from './bridge-options'

/**
 * Reads each queue's BullMQ event stream ONCE across the cluster, through a consumer group all
 * instances share, and publishes every relevant event to its job's own channel. An entry is
 * acknowledged only after it was published; entries a dead instance took but never acknowledged
 * are claimed by the others after `claimIdleMs`, so a SIGKILL loses no final state.
 *
 * This class wires the parts: the consumer groups, the read loop (StreamReader) or the ordered
 * relay (OrderedRelay), the delivery of each batch to the listeners and its acknowledgement
 * (BatchDelivery, Acks), gap recovery, and the periodic consumer sweep.
 */
export class Bridge {
  readonly #o: BridgeOptions
  readonly #run = new RunState()
  readonly #groups: ConsumerGroups
  readonly #gaps: GapRecovery
  readonly #acks: Acks
  readonly #delivery: BatchDelivery
  readonly #reader: StreamReader
  readonly #relay: OrderedRelay
  readonly #sweep: ConsumerSweep
  #loops: Array<Promise<void>> = []

  constructor (opts: BridgeOptions) {
    this.#o = opts
    const streams = opts.queues.map(q => opts.keys.queueKey(q, 'events'))
    const floor = new StreamFloor()
    this.#gaps = new GapRecovery(opts, streams, this.#run, floor)
    this.#groups = new ConsumerGroups(opts, streams, this.#gaps, floor)
    this.#acks = new Acks(opts)
    this.#delivery = new BatchDelivery(opts, this.#acks)
    this.#reader = new StreamReader(opts, this.#run, this.#groups, this.#delivery)
    this.#relay = new OrderedRelay(opts, this.#run, this.#groups, this.#delivery)
    this.#sweep = new ConsumerSweep(opts, this.#run, this.#groups, this.#delivery, this.#gaps, this.#relay)
  }

  /** Events published since start (for tests and metrics). */
  get published (): number {
    return this.#delivery.published + this.#relay.published
  }

  /** Faults this bridge detected and announced (for tests and metrics). */
  get faults (): number {
    return this.#gaps.faults
  }

  async start (): Promise<void> {
    const t = this.#o.telemetry ?? noTelemetry
    t.gauge('bridgeLag', () => this.#gaps.lagByQueue())
    this.#run.start()
    await this.#groups.ensure().catch((err: Error) => this.#o.log.warn({ err }, 'job-progress: cannot create the bridge consumer group yet; will retry'))
    // One blocking read cannot span cluster slots: one loop per slot (a single one standalone,
    // or with a hash-tagged prefix that puts every queue in one slot).
    const groups = new Map<number, string[]>()
    for (const stream of this.#groups.streams) {
      const slot = this.#o.broker?.keyGroup(stream) ?? 0
      groups.set(slot, [...(groups.get(slot) ?? []), stream])
    }
    // A gap that opened while no bridge ran (every instance down, the stream trimmed meanwhile)
    // is claimed before this one reads on, and its finals recovered.
    await this.#gaps.checkTrim().catch((err: Error) => this.#o.log.debug({ err }, 'job-progress: first stream check failed; the periodic one retries'))
    const ordered = this.#groups.ordered
    if (ordered) this.#relay.define()
    this.#loops = [...groups.values()].map(async streams => ordered ? await this.#relay.run(streams) : await this.#reader.run(streams))
    this.#sweep.start()
  }

  /** Stops reading so other instances take over; acknowledged work is never lost. */
  async close (): Promise<void> {
    this.#run.stop()
    this.#sweep.stop()
    // The blocking read would hold close() for up to blockMs: cut it short.
    this.#o.blocking.disconnect()
    await Promise.all(this.#loops)
    // A wake-up taken just before close would leave its entries to the others' periodic check.
    if (this.#groups.ordered && this.#o.redis.status === 'ready') {
      for (const stream of this.#groups.streams) await this.#relay.relayNow(stream).catch(() => {})
    }
    // A batch whose listeners are still running (a webhook being queued) is acknowledged with the
    // rest when they finish in time; else it stays pending and another instance replays it.
    await this.#delivery.settleInFlight()
    // A recovery stopped between pages goes on from its cursor on the next instance's check.
    await this.#gaps.finals.settle()
    await this.#acks.flush()
    await this.#groups.leave()
  }
}
