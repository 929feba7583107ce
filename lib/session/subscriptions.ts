import type { JobEvent } from '../core/event'
import type { OpenedJob, Sink } from '../hub/hub'
import type { SnapshotTarget } from '../core/snapshot'
import type { LogFeed } from '../channels/logs/live-logs'
import type { StreamFeeds } from './stream-feed'

/** Where a subscription's events go: its session's jobs, one object per session. */
export interface Deliveries {
  deliver: (sub: Subscription, event: JobEvent) => void
}

/**
 * One subscribed job of a session, and the sink its events come to: an object with a method, not
 * a closure per subscription (a storm makes thousands, kept while they last).
 */
export class Subscription implements Sink {
  readonly opened: OpenedJob
  readonly target: SnapshotTarget
  readonly #to: Deliveries
  final = false
  /** The last event delivered, so a repeated subscribe answers with the current state too. */
  last: JobEvent | null = null
  /** The last message sent for it. */
  sent?: string
  /** Its log lines, when asked for. */
  logs?: { feed: LogFeed, stop: () => void }
  /** Its named streams, when asked for. */
  streams?: StreamFeeds

  constructor (opened: OpenedJob, target: SnapshotTarget, to: Deliveries) {
    this.opened = opened
    this.target = target
    this.#to = to
  }

  /** Where the hub delivers this job's events: the subscription itself. */
  get sink (): Sink {
    return this
  }

  deliver (event: JobEvent): void {
    this.#to.deliver(this, event)
  }
}

/**
 * A session's subscriptions by job id. Most connections watch one job (the per-job route, an SSE
 * stream of one job): that one is held as it is, and a map is made only for a second one.
 */
export class Subscriptions {
  #one: Subscription | null = null
  #many: Map<string, Subscription> | null = null

  get size (): number {
    return this.#many !== null ? this.#many.size : this.#one === null ? 0 : 1
  }

  get (jobId: string): Subscription | undefined {
    if (this.#many !== null) return this.#many.get(jobId)
    return this.#one?.target.jobId === jobId ? this.#one : undefined
  }

  /** Adds `sub` under its job's id, in place of one there. */
  add (sub: Subscription): void {
    const jobId = sub.target.jobId
    if (this.#many === null) {
      if (this.#one === null || this.#one.target.jobId === jobId) {
        this.#one = sub
        return
      }
      this.#many = new Map([[this.#one.target.jobId, this.#one]])
      this.#one = null
    }
    this.#many.set(jobId, sub)
  }

  delete (jobId: string): void {
    if (this.#many !== null) this.#many.delete(jobId)
    else if (this.#one?.target.jobId === jobId) this.#one = null
  }

  values (): Iterable<Subscription> {
    return this.#many !== null ? this.#many.values() : this.#one === null ? [] : [this.#one]
  }

  clear (): void {
    this.#one = null
    this.#many = null
  }
}
