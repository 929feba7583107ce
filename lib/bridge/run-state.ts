/** What the bridge's loops ask of its run: whether it still runs, and a wait that close() can end. */
export interface Running {
  /** False once close() began. */
  readonly running: boolean
  /** What `promise` settles with, or null once close() began, whichever comes first. */
  unlessStopped: <T>(promise: Promise<T>) => Promise<T | null>
}

/** Whether the bridge runs, and the waits close() ends. */
export class RunState implements Running {
  #running = false
  /**
   * What close() calls to end the waits in flight, so a loop never waits on a read that cannot
   * end. One callback per wait, dropped when it ends: racing every read against one promise that
   * lives until close() would keep every read's reply (each race adds a reaction to it).
   */
  readonly #waits = new Set<() => void>()

  get running (): boolean {
    return this.#running
  }

  start (): void {
    this.#running = true
  }

  /** Ends every wait in flight: each returns null. */
  stop (): void {
    this.#running = false
    for (const stop of this.#waits) stop()
    this.#waits.clear()
  }

  async unlessStopped<T> (promise: Promise<T>): Promise<T | null> {
    if (!this.#running) return null
    return await new Promise<T | null>((resolve, reject) => {
      const stop = (): void => resolve(null)
      this.#waits.add(stop)
      promise.then((value) => {
        this.#waits.delete(stop)
        resolve(value)
      }, (err) => {
        this.#waits.delete(stop)
        reject(err)
      })
    })
  }
}
