import { entryOf, isFinal, sameState, supersedes, type JobEvent } from '../core/event'
import type { Snapshot } from '../core/snapshot'
import type { Telemetry } from '../core/telemetry'
import { noTracing, type Tracing } from '../core/tracing'
import type { Watch } from './watch'

/**
 * What a watch's sinks are offered: only a newer state than the last, at most one non-final state
 * per throttle period (the newest replaces what waits), a final state at once.
 */
export class Conflation {
  readonly #throttleMs: number
  readonly #t: Telemetry

  readonly #onRead: (watch: Watch) => void
  readonly #tracing: Tracing

  /** `onRead` learns of every read of a job applied (the sweep's clock). */
  constructor (throttleMs: number, telemetry: Telemetry, onRead: (watch: Watch) => void = () => {}, tracing: Tracing = noTracing) {
    this.#throttleMs = throttleMs
    this.#t = telemetry
    this.#onRead = onRead
    this.#tracing = tracing
  }

  /** Applies a read of the job; true when it changed what watchers see. */
  apply (watch: Watch, snapshot: Snapshot): boolean {
    // A read that left Redis before a newer relayed event arrived must not undo it: its version
    // (the stream's last entry, read with the job) is older, and the offer refuses it.
    const before = watch.last
    const changed = this.offer(watch, snapshot.event)
    if (watch.last !== before && snapshot.startedAt !== null) watch.startedAt = snapshot.startedAt
    this.#onRead(watch)
    return changed
  }

  /**
   * Offers a state; true when watchers are to see it. The state and the stream entry it reflects
   * move together, and only when the version says it is newer: an entry id stored for a state
   * that was refused would make the next, real, state look stale.
   */
  offer (watch: Watch, event: JobEvent): boolean {
    const last = watch.last
    if (!supersedes(event, last)) return false
    watch.last = event
    const entry = entryOf(event)
    if (entry !== null) watch.entry = entry
    // A later read that says what the last one said (the queue moved on, this job did not) keeps
    // the newer version for what comes next, and sends nothing.
    if (last !== null && sameState(event, last)) {
      if (watch.emitted === last) watch.emitted = event
      return false
    }
    const wait = watch.lastEmitAt + this.#throttleMs - Date.now()
    if (isFinal(event.state) || wait <= 0) {
      this.#flush(watch)
    } else if (watch.timer === null) {
      watch.timer = setTimeout(() => {
        watch.timer = null
        this.#flush(watch)
      }, wait)
    }
    return true
  }

  #flush (watch: Watch): void {
    if (watch.timer !== null) {
      clearTimeout(watch.timer)
      watch.timer = null
    }
    const event = watch.last
    if (event === null || event === watch.emitted) return
    watch.emitted = event
    watch.lastEmitAt = Date.now()
    const count = watch.sinkCount
    if (count > 0) this.#t.count('eventsRelayed')
    // A state from a sampled report is written inside its delivery span; any other costs a lookup.
    const delivery = this.#tracing.delivery(event, watch.target.queue, count)
    const many = watch.many
    if (delivery === null) {
      if (many !== null) for (const sink of many) sink.deliver(event)
      else watch.one?.deliver(event)
      return
    }
    try {
      if (many !== null) {
        for (const sink of many) {
          sink.deliver(event)
          delivery.written()
        }
      } else if (watch.one !== null) {
        watch.one.deliver(event)
        delivery.written()
      }
    } finally {
      delivery.end()
    }
  }
}
