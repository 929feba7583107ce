const RESOLVED = Promise.resolve()

/** Told once when a step started at once has ended: null, or what it failed with. */
export interface StepEnd {
  end: (err: unknown) => void
}

/** Whose steps they are: told of a failed step (the connection is then closed) and of each action answered. */
export interface StepOwner {
  stepFailed: (err: Error) => void
  /** A step started at once ({@link StepOrder.start}) ended: its action is answered. */
  stepAnswered: () => void
}

/**
 * A step started at once ({@link StepOrder.start}): no promise of its own unless a later step
 * has to wait for it (most never do: a storm's subscribes are each the only step of their job).
 */
class StartedStep implements StepEnd {
  readonly #order: StepOrder
  readonly #key: string
  #ended = false
  #done: Promise<void> | null = null
  #resolve: (() => void) | null = null

  constructor (order: StepOrder, key: string) {
    this.#order = order
    this.#key = key
  }

  /** Settles once the step ends (at once if it has). */
  get done (): Promise<void> {
    if (this.#ended) return RESOLVED
    this.#done ??= new Promise(resolve => { this.#resolve = resolve })
    return this.#done
  }

  end (err: unknown): void {
    if (this.#ended) return
    this.#ended = true
    this.#order.ended(this.#key, this, err)
    this.#resolve?.()
  }
}

/**
 * The order of one connection's steps. Steps for the connection as a whole (authentication, the
 * jobs feed) run one after the other. A job's steps run after them and in the order asked, but
 * jobs do not wait on each other (a socket that subscribes 100 jobs waits about one open, not 100
 * in a row). An unsubscribe waits for everything asked before it and holds back everything asked
 * after it, so the room it frees under the subscription limit is there for the next subscribe.
 *
 * A job's step that has nothing to wait for may start at once ({@link start}): it is kept as one
 * small object, and a later step of the same job (or an unsubscribe) waits for its end.
 */
export class StepOrder {
  /** The session: a method each, not a closure per session (a server holds thousands). */
  readonly #owner: StepOwner
  #chain: Promise<void> = RESOLVED
  /** Per job, its waiting steps in the order asked. */
  #jobChains: Map<string, Promise<void>> | null = null
  /** Per job, its step started at once and not yet ended. */
  #started: Map<string, StartedStep> | null = null
  /** The last unsubscribe: steps asked after it wait for it. */
  #barrier: Promise<void> | null = null

  constructor (owner: StepOwner) {
    this.#owner = owner
  }

  /** A step of the connection as a whole, after every such step asked before it. */
  enqueue (step: () => Promise<void> | void): void {
    const tail = this.#chain.then(step).catch((err: Error) => this.#owner.stepFailed(err))
    this.#chain = tail
    // Once done, an idle connection does not keep the settled chain.
    void tail.then(() => { if (this.#chain === tail) this.#chain = RESOLVED })
  }

  /** A step of one job (a barrier for an unsubscribe): see the class. */
  enqueueFor (jobId: unknown, step: () => Promise<void>, barrier = false): void {
    const key = typeof jobId === 'string' ? jobId : ''
    const chains = this.#jobChains ??= new Map()
    const started = this.#started
    // No step starts at once while an unsubscribe waits: the ones started are all before it,
    // and it waits for them.
    const base = this.#barrier ?? started?.get(key)?.done ?? this.#chain
    const after = barrier
      ? Promise.all([base, ...chains.values(), ...(started === null ? [] : [...started.values()].map(s => s.done))])
      : (chains.get(key) ?? base)
    const tail = after.then(step).catch((err: Error) => this.#owner.stepFailed(err))
    if (barrier) {
      this.#barrier = tail
      this.#jobChains = null
      // Once done, an idle connection does not keep the settled unsubscribe.
      void tail.then(() => { if (this.#barrier === tail) this.#barrier = null })
      return
    }
    chains.set(key, tail)
    void tail.then(() => {
      if (chains.get(key) !== tail) return
      chains.delete(key)
      if (chains.size === 0 && this.#jobChains === chains) this.#jobChains = null
    })
  }

  /**
   * A step of `jobId` that may start now, without a promise: nothing of the connection as a
   * whole and nothing of this job is waiting, and no unsubscribe. Its end is told to what this
   * returns (once); null when it has to wait its turn ({@link enqueueFor}).
   */
  start (jobId: string): StepEnd | null {
    if (this.#barrier !== null || this.#chain !== RESOLVED || this.#jobChains?.has(jobId) === true || this.#started?.has(jobId) === true) return null
    const step = new StartedStep(this, jobId)
    ;(this.#started ??= new Map()).set(jobId, step)
    return step
  }

  /** From a step started at once: it ended. */
  ended (key: string, step: StepEnd, err: unknown): void {
    const started = this.#started
    if (started?.get(key) === step) {
      started.delete(key)
      if (started.size === 0) this.#started = null
    }
    this.#owner.stepAnswered()
    if (err !== null) this.#owner.stepFailed(err instanceof Error ? err : new Error(String(err)))
  }
}
