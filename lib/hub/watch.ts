import type { JobEvent } from '../core/event'
import type { SnapshotTarget } from '../core/snapshot'
import type { RelayMessage } from '../wire/relay'
import { NO_ENTRY } from '../wire/version'

/** Receives a job's events; a protocol connection holds one per subscribed job. */
export interface Sink {
  deliver: (event: JobEvent) => void
}

/** One job watched on this instance: its channel, its sinks and the state they were sent. */
export class Watch {
  readonly channel: string
  readonly target: SnapshotTarget
  /**
   * Its sinks: the one held as it is, a set made only for a second (a storm watches thousands of
   * jobs one socket each; a set each would be most of a watch's memory).
   */
  one: Sink | null = null
  many: Set<Sink> | null = null
  /** Opens in flight: a watch is kept while somebody is still deciding to attach. */
  opening = 0
  startedAt: number | null = null
  last: JobEvent | null = null
  emitted: JobEvent | null = null
  lastEmitAt = 0
  timer: NodeJS.Timeout | null = null
  /** The newest stream entry this watch's state reflects: older relay messages are stale. */
  entry = NO_ENTRY
  /** Progress that arrived between SUBSCRIBE and the first snapshot. */
  early: RelayMessage | null = null
  refreshing = false
  refreshAgain: string | null = null
  /** Whether an over-limit report of this job was logged already. */
  clipLogged = false

  constructor (channel: string, target: SnapshotTarget) {
    this.channel = channel
    this.target = target
  }

  get sinkCount (): number {
    return this.many !== null ? this.many.size : this.one === null ? 0 : 1
  }

  addSink (sink: Sink): void {
    if (this.many !== null) this.many.add(sink)
    else if (this.one === null || this.one === sink) this.one = sink
    else {
      this.many = new Set([this.one, sink])
      this.one = null
    }
  }

  deleteSink (sink: Sink): void {
    if (this.many !== null) this.many.delete(sink)
    else if (this.one === sink) this.one = null
  }
}
