/** Most jobs one pipelined read or one SUBSCRIBE carries in a storm. */
export const BATCH = 500

/** Told the outcome of one call of a batch: its result, or why the batch failed. Must not throw. */
export interface BatchReceiver<R> {
  settle: (result: R) => void
  fail: (err: unknown) => void
}

/** A promise's two ends as a receiver, for callers that await. */
class Settler<R> implements BatchReceiver<R> {
  readonly settle: (result: R) => void
  readonly fail: (err: unknown) => void
  constructor (resolve: (result: R) => void, reject: (err: unknown) => void) {
    this.settle = resolve
    this.fail = reject
  }
}

/**
 * Gathers calls made in one turn of the event loop into one batch, up to {@link BATCH} each. Kept
 * in parallel arrays: a storm pays one receiver per call (or one promise) and nothing else.
 */
export class Batcher<T, X, R> {
  #items: T[] = []
  #extras: X[] = []
  #receivers: Array<BatchReceiver<R>> = []
  readonly #run: (items: T[], extras: X[]) => Promise<R[]>
  readonly #flushNow = (): void => this.#flush()

  constructor (run: (items: T[], extras: X[]) => Promise<R[]>) {
    this.#run = run
  }

  async add (item: T, extra: X): Promise<R> {
    return await new Promise<R>((resolve, reject) => this.send(item, extra, new Settler(resolve, reject)))
  }

  /** Adds a call whose outcome goes to `receiver`, without a promise of its own. */
  send (item: T, extra: X, receiver: BatchReceiver<R>): void {
    if (this.#items.length === 0) setImmediate(this.#flushNow)
    this.#items.push(item)
    this.#extras.push(extra)
    this.#receivers.push(receiver)
  }

  #flush (): void {
    const items = this.#items
    const extras = this.#extras
    const receivers = this.#receivers
    this.#items = []
    this.#extras = []
    this.#receivers = []
    for (let i = 0; i < items.length; i += BATCH) {
      const end = Math.min(items.length, i + BATCH)
      const run = i === 0 && end === items.length ? this.#run(items, extras) : this.#run(items.slice(i, end), extras.slice(i, end))
      run.then(
        results => { for (let j = i; j < end; j++) receivers[j].settle(results[j - i]) },
        err => { for (let j = i; j < end; j++) receivers[j].fail(err) }
      )
    }
  }
}
