import type { JobEvent } from '../core/event'
import type { Snapshot } from '../core/snapshot'
import type { Sink, Watch } from './watch'

/** What {@link Hub.open} hands back: the job as it is now, and a way to attach or let go. */
export interface OpenedJob {
  snapshot: Snapshot
  attach: (sink: Sink) => void
  detach: (sink: Sink) => void
}

/** Where an opened job lets go of its watch: one object for every opener, not a function each. */
export interface WatchDropper {
  drop: (watch: Watch) => void
}

/**
 * A job opened for one watcher: a plain object with methods, not closures, as a storm makes one
 * per subscription and keeps it as long as the subscription lasts.
 */
export class Opened implements OpenedJob {
  readonly #watch: Watch
  readonly #owner: string | null
  readonly #startedAt: number | null
  readonly #entryId: string
  /** The read's state, kept only when the watch has none (the watch's is newer and shared). */
  readonly #event: JobEvent | null
  readonly #watches: WatchDropper
  #attached = false

  constructor (watch: Watch, read: Snapshot, watches: WatchDropper) {
    // Not the read itself: a finished job's result is in it, and a subscription lives long.
    this.#watch = watch
    this.#owner = read.owner
    this.#startedAt = read.startedAt
    this.#entryId = read.entryId
    this.#event = watch.last === null ? read.event : null
    this.#watches = watches
  }

  /** As read, with the newest state the watch has now. */
  get snapshot (): Snapshot {
    return { event: this.#watch.last ?? this.#event as JobEvent, owner: this.#owner, startedAt: this.#startedAt, data: null, entryId: this.#entryId }
  }

  attach (sink: Sink): void {
    if (this.#attached) return
    this.#attached = true
    const w = this.#watch
    w.opening--
    w.addSink(sink)
    if (w.last !== null) sink.deliver(w.last)
  }

  detach (sink: Sink): void {
    const w = this.#watch
    if (!this.#attached) {
      this.#attached = true
      w.opening--
    } else {
      w.deleteSink(sink)
    }
    this.#watches.drop(w)
  }
}
