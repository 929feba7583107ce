/** Most jobs one pipelined read or one SUBSCRIBE carries in a storm. */
export const BATCH = 500

/**
 * Gathers calls made in one turn of the event loop into one batch, up to {@link BATCH} each. Kept
 * in parallel arrays: a storm pays one promise per call and nothing else.
 */
export class Batcher<T, X, R> {
  #items: T[] = []
  #extras: X[] = []
  #resolves: Array<(r: R) => void> = []
  #rejects: Array<(e: unknown) => void> = []
  readonly #run: (items: T[], extras: X[]) => Promise<R[]>
  readonly #flushNow = (): void => this.#flush()

  constructor (run: (items: T[], extras: X[]) => Promise<R[]>) {
    this.#run = run
  }

  async add (item: T, extra: X): Promise<R> {
    return await new Promise<R>((resolve, reject) => {
      if (this.#items.length === 0) setImmediate(this.#flushNow)
      this.#items.push(item)
      this.#extras.push(extra)
      this.#resolves.push(resolve)
      this.#rejects.push(reject)
    })
  }

  #flush (): void {
    const items = this.#items
    const extras = this.#extras
    const resolves = this.#resolves
    const rejects = this.#rejects
    this.#items = []
    this.#extras = []
    this.#resolves = []
    this.#rejects = []
    for (let i = 0; i < items.length; i += BATCH) {
      const end = Math.min(items.length, i + BATCH)
      const run = i === 0 && end === items.length ? this.#run(items, extras) : this.#run(items.slice(i, end), extras.slice(i, end))
      run.then(
        results => { for (let j = i; j < end; j++) resolves[j](results[j - i]) },
        err => { for (let j = i; j < end; j++) rejects[j](err) }
      )
    }
  }
}
