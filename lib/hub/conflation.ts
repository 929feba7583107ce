import { isFinal, isNewer, type JobEvent } from '../core/event'
import type { Snapshot } from '../core/snapshot'
import type { Telemetry } from '../core/telemetry'
import { compareEntryIds } from '../wire/version'
import type { Watch } from './watch'

/**
 * What a watch's sinks are offered: only a newer state than the last, at most one non-final state
 * per throttle period (the newest replaces what waits), a final state at once.
 */
export class Conflation {
  readonly #throttleMs: number
  readonly #t: Telemetry

  constructor (throttleMs: number, telemetry: Telemetry) {
    this.#throttleMs = throttleMs
    this.#t = telemetry
  }

  /** Applies a read of the job. */
  apply (watch: Watch, snapshot: Snapshot): void {
    // A read that left Redis before a newer relayed event arrived must not undo it.
    if (compareEntryIds(snapshot.entryId, watch.entry) < 0 && !isFinal(snapshot.event.state)) return
    watch.entry = snapshot.entryId
    if (snapshot.startedAt !== null) watch.startedAt = snapshot.startedAt
    this.offer(watch, snapshot.event)
  }

  offer (watch: Watch, event: JobEvent): void {
    if (!isNewer(event, watch.last)) return
    watch.last = event
    const wait = watch.lastEmitAt + this.#throttleMs - Date.now()
    if (isFinal(event.state) || wait <= 0) {
      this.#flush(watch)
    } else if (watch.timer === null) {
      watch.timer = setTimeout(() => {
        watch.timer = null
        this.#flush(watch)
      }, wait)
    }
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
    if (watch.sinks.size > 0) this.#t.count('eventsRelayed')
    for (const sink of watch.sinks) sink.deliver(event)
  }
}
