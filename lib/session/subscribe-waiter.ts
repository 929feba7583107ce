import type { OpenedJob, OpenWaiter } from '../hub/hub'
import type { SnapshotTarget } from '../core/snapshot'
import type { StepEnd } from './step-order'

/** What a waiting subscribe does to its connection's jobs (lib/session/session-jobs.ts). */
export interface QuickOpens {
  /** Found at `target`: subscribed, or let go when the connection stopped serving meanwhile. */
  adopt: (jobId: string, target: SnapshotTarget, opened: OpenedJob) => void
  /** Not found (or not the caller's): the client is told. */
  missed: (jobId: string) => void
  /** Answered, whatever the outcome: no longer counted as opening, nor as pending when `counted`. */
  settled: (counted: boolean) => void
}

/**
 * One subscribe waiting for the hub's batch, as one object: what it asked for, and what to tell
 * when it has ended (lib/session/step-order.ts). Never throws back into the batch: a failure is
 * told there (the session then closes the connection, as for any failed step).
 */
export class SubscribeWaiter implements OpenWaiter {
  readonly #jobs: QuickOpens
  readonly #jobId: string
  readonly #targets: SnapshotTarget[]
  readonly #counted: boolean
  readonly #end: StepEnd

  constructor (jobs: QuickOpens, jobId: string, targets: SnapshotTarget[], counted: boolean, end: StepEnd) {
    this.#jobs = jobs
    this.#jobId = jobId
    this.#targets = targets
    this.#counted = counted
    this.#end = end
  }

  opened (index: number, opened: OpenedJob): void {
    this.#run(() => this.#jobs.adopt(this.#jobId, this.#targets[index], opened))
  }

  notFound (): void {
    this.#run(() => this.#jobs.missed(this.#jobId))
  }

  failed (err: Error): void {
    this.#run(() => { throw err })
  }

  #run (step: () => void): void {
    let error: unknown = null
    try {
      step()
    } catch (err) {
      error = err
    }
    try {
      this.#jobs.settled(this.#counted)
    } catch (err) {
      error ??= err
    }
    this.#end.end(error)
  }
}
