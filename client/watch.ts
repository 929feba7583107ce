import { JobFailedError, JobProgressError, NotFoundError } from './errors'
import type { JobUpdate } from './types'
import type { LogMessage } from '../lib/wire/messages'
import type { StreamMessage } from '../lib/wire/streams'

type Listener<T> = (value: T) => void

const FINAL = new Set(['succeeded', 'failed', 'cancelled'])

/** A version's numbers (`<attempt>.<ms>-<seq>`: at 1, 2 and 3), or undefined when it is not one. */
const parts = (v: string): number[] | undefined => /^(\d+)\.(\d+)-(\d+)$/.exec(v)?.map(Number)

/**
 * Whether version `a` is older than `b`, in the order of lib/wire/version's compareVersions: the
 * stream entry id decides, the attempt only between equal ids; an unparsable version is older
 * than every valid one.
 */
const older = (a: string, b: string): boolean => {
  const x = parts(a)
  const y = parts(b)
  return x && y ? (x[2] - y[2] || x[3] - y[3] || x[1] - y[1]) < 0 : !x && !!y
}

/** One watched job: an async iterable of its updates, its current state, and how it ended. */
export class Watch implements AsyncIterable<JobUpdate> {
  declare readonly kind: string
  declare readonly jobId: string
  /** Resolves with the final `succeeded` update; rejects with JobFailedError, NotFoundError or AuthError. */
  declare readonly done: Promise<JobUpdate>
  current: JobUpdate | null = null
  #listeners = new Set<Listener<JobUpdate>>()
  #settle!: (error?: Error, final?: JobUpdate) => void
  /** Once ended: the error it ended with, or null. */
  #ended: Error | null | undefined
  #stop: () => void
  /** @internal whether log lines were asked for, and the offset of the next one */
  logs = false
  next = 0
  #logFns = new Set<Listener<LogMessage>>()
  /** @internal the streams asked for: the offset of the next chunk of each */
  streams?: Record<string, number>
  #streamFns = new Set<Listener<StreamMessage>>()
  #askLogs: () => void
  /** The offset each stream was last asked for again from, after a gap. */
  #asked: Record<string, number> = {}

  constructor (kind: string, jobId: string, stop: () => void, askLogs: () => void) {
    this.kind = kind
    this.jobId = jobId
    this.#stop = stop
    this.#askLogs = askLogs
    this.done = new Promise((resolve, reject) => { this.#settle = (error, final) => error ? reject(error) : resolve(final as JobUpdate) })
    // Awaiting `done` is optional: an unawaited failure must not crash Node.
    this.done.catch(() => {})
  }

  get ended (): boolean {
    return this.#ended !== undefined
  }

  /** Calls `fn` with every update (and at once with the current one); returns the unsubscribe. */
  onUpdate (fn: Listener<JobUpdate>): () => void {
    this.#listeners.add(fn)
    if (this.current) fn(this.current)
    return () => this.#listeners.delete(fn)
  }

  /**
   * Calls `fn` with each of the job's log lines (`{ type: 'log', offset, line }`), each offset
   * once and in order, across reconnects; `{ type: 'logs_truncated', from, next }` names lines
   * that were not sent (fetch them from the logs route). The first call asks the server for them.
   */
  onLog (fn: Listener<LogMessage>): () => void {
    this.#logFns.add(fn)
    if (!this.logs) {
      this.logs = true
      this.#askLogs()
    }
    return () => this.#logFns.delete(fn)
  }

  /**
   * The chunks of the job's stream `name`, in order, each once, from offset `from` (on the first
   * call for that name): after a reconnect, WebSocket or SSE, the server is asked for them from the
   * next offset. Ends after the stream's end, or once the job has ended.
   */
  stream (name: string, from = 0): AsyncIterableIterator<unknown> {
    const s = this.streams ??= {}
    if (!(name in s)) {
      s[name] = from
      this.#askLogs()
    }
    return iterate(this, (push, stop) => {
      const fn = (m: StreamMessage): void => { if (m.name === name) m.type === 'stream' ? push(m.chunk) : stop() }
      this.#streamFns.add(fn)
      return () => this.#streamFns.delete(fn)
    })
  }

  /**
   * @internal A message of the `jobs` protocol or an SSE event (`type`) for this job: an error
   * naming it (not found, or a limit such as subscriptions), log lines or stream chunks.
   */
  _msg (type: string, m: any): void {
    if (type === 'error') return this._end(/not found/i.test(m.message) ? new NotFoundError(this.jobId, m.message) : new JobProgressError(m.message))
    // `log` and `logs_truncated`.
    if (/^log/.test(type)) {
      const next = this.next
      if (m.type === 'log' ? m.offset < next : m.next <= next) return
      // A gap starts at the first line this watch does not have.
      if (m.type !== 'log' && m.from < next) m.from = next
      this.next = m.type === 'log' ? m.offset + 1 : m.next
      for (const fn of this.#logFns) fn(m)
    }
    // `stream`, `stream_end` and `stream_truncated`.
    const s = this.streams
    const next = s?.[m.name]
    if (!/^stream/.test(type) || next === undefined) return
    // Chunks skipped for a slow reader, or one past the next expected (those before it were
    // lost): asked for again from the first missing one, once per gap.
    if (type === 'stream_truncated' || m.offset > next) {
      if (type === 'stream_truncated' || this.#asked[m.name] !== next) this.#askLogs()
      this.#asked[m.name] = next
      return
    }
    if (m.offset < next) return
    if (type === 'stream') (s as Record<string, number>)[m.name]++
    for (const fn of this.#streamFns) fn(m)
  }

  /** Stops watching (the connection unsubscribes); `done` stays pending. */
  stop (): void {
    this.#stop()
  }

  /** @internal */
  _update (u: JobUpdate): boolean {
    const last = this.current
    if (this.ended || (last && (
      // The version orders states across transports and instances (a retry is a newer attempt);
      // without one, progress within a status only goes forward.
      u.version && last.version
        ? older(u.version, last.version)
        : !FINAL.has(u.status) && u.status === last.status && u.processed < last.processed))) return false
    this.current = u
    for (const fn of this.#listeners) fn(u)
    if (FINAL.has(u.status)) this._end(u.status === 'succeeded' ? undefined : new JobFailedError(u), u)
    return true
  }

  /** @internal */
  _end (error?: Error, final?: JobUpdate): void {
    if (this.ended) return
    this.#ended = error ?? null
    this.#settle(error, final)
    for (const fn of this.#listeners) fn(this.current as JobUpdate)
  }

  async * [Symbol.asyncIterator] (): AsyncIterator<JobUpdate> {
    let last: JobUpdate | undefined
    yield * iterate<JobUpdate>(this, push => this.onUpdate((u) => { if (u && u !== last) push(last = u) }))
    const error = this.#ended
    if (error && !(error instanceof JobFailedError)) throw error
  }
}

/**
 * What `listen` pushes, in order (`latest`: only the newest not yet read), until it calls stop or
 * `w` (a watch, a list of the caller's jobs) ends.
 */
export function iterate<T> (w: { ended: boolean, onUpdate: (fn: () => void) => () => void }, listen: (push: (value: T) => void, stop: () => void) => () => void, latest?: boolean): AsyncIterableIterator<T> {
  const queue: T[] = []
  let wake = (): void => {}
  let done = false
  const off = listen((value) => { if (latest) queue.length = 0; queue.push(value); wake() }, () => { done = true; wake() })
  const offEnd = w.onUpdate(() => wake())
  return (async function * () {
    try {
      for (;;) {
        if (queue.length) yield queue.shift() as T
        else if (done || w.ended) return
        else await new Promise<void>(resolve => { wake = resolve })
      }
    } finally {
      off()
      offEnd()
    }
  })()
}

export interface UploadedJob {
  kind: string
  jobId: string
  statusUrl: string
  /** Starts watching the job (same as `client.watch(kind, jobId)`). */
  watch: () => Watch
}
