import type { Redis } from 'ioredis'
import { scriptRelay } from '../broker/create-broker'
import { Keys } from '../core/keys'
import { APPENDED, APPEND_BATCH, STREAM_LIMITS, appendChunks, endStream, readStream, type StreamLimits, type StreamRead } from '../channels/streams/stream-store'
import { isStreamName } from '../wire/streams'

export { STREAM_LIMITS, type StreamLimits, type StreamRead }

/** Thrown to a stream's writer when a limit is reached; readers get a `stream_end` with reason `limit`. */
export class StreamLimitError extends Error {
  readonly code = 'JP_STREAM_LIMIT'
  constructor (message: string) {
    super(message)
    this.name = 'StreamLimitError'
  }
}

/**
 * Thrown by `write()` when more than `maxQueuedBytes` of the stream's chunks already wait to be
 * stored (the writer does not await its writes and Redis is slower): nothing of this chunk is
 * stored, the stream goes on. `pipe()` waits for room instead.
 */
export class StreamBackpressureError extends Error {
  readonly code = 'JP_STREAM_BACKPRESSURE'
  constructor (message: string) {
    super(message)
    this.name = 'StreamBackpressureError'
  }
}

/** A named stream of one job, written in order: chunks are strings or JSON values. */
export interface JobStream {
  readonly name: string
  /**
   * Stores a chunk, relays it to the stream's watchers, and resolves with its offset once stored.
   * Chunks are stored in the order of the calls; those written while a store is in flight go
   * together in the next one. Throws {@link StreamBackpressureError} past `maxQueuedBytes` waiting.
   */
  write: (chunk: unknown) => Promise<number>
  /**
   * Writes every chunk of `source` (bytes are decoded as UTF-8 text), in order, in batches; waits
   * while `maxQueuedBytes` wait to be stored (back-pressure on the source); does not end the stream.
   * Throws the first write's error, after the chunks before it are stored.
   */
  pipe: (source: AsyncIterable<unknown> | ReadableStream<unknown>) => Promise<void>
  /** Ends the stream: watchers get `stream_end` once they have every chunk. A second end does nothing. */
  end: () => Promise<void>
}

export interface OpenJobStreamOptions {
  queue: string
  jobId: string
  name: string
  /** BullMQ's key prefix; the plugin's `prefix`. @default 'bull' */
  prefix?: string
  /** The plugin's `channelPrefix`. @default 'jp' */
  channelPrefix?: string
  /** The plugin's `pubsub`. @default sharded on a Cluster connection, classic otherwise */
  pubsub?: 'classic' | 'sharded'
  /** @default {@link STREAM_LIMITS} */
  limits?: Partial<StreamLimits>
}

/** Opens a job's named stream from a plain BullMQ worker (the helper's `ctx.stream(name)` is this). */
export function openJobStream (redis: Redis, opts: OpenJobStreamOptions): JobStream {
  const keys = new Keys({ prefix: opts.prefix ?? 'bull', channelPrefix: opts.channelPrefix ?? 'jp' })
  return jobStream(async () => redis, keys, opts.queue, opts.jobId, opts.name, { ...STREAM_LIMITS, ...opts.limits }, opts.pubsub)
}

/**
 * Reads a page of a job's stream from server code of your own (a resume route): chunks from
 * `from` (default 0), at most `limit` (default 1000), the count so far and how it ended. It checks
 * no ownership: the route serving it must.
 */
export async function readJobStream (redis: Redis, opts: Omit<OpenJobStreamOptions, 'pubsub' | 'limits'> & { from?: number, limit?: number }): Promise<StreamRead> {
  const keys = new Keys({ prefix: opts.prefix ?? 'bull', channelPrefix: opts.channelPrefix ?? 'jp' })
  return await readStream(redis, keys, opts.queue, opts.jobId, opts.name, opts.from ?? 0, opts.limit ?? 1000)
}

export function jobStream (client: () => Promise<Redis>, keys: Keys, queue: string, jobId: string, name: string, limits: StreamLimits, pubsub?: 'classic' | 'sharded'): JobStream {
  if (!isStreamName(name)) throw new TypeError(`job-progress: stream name ${JSON.stringify(name)}: letters, digits, ".", "_", "-", at most 64 characters`)
  // One queue per stream, in the order of the calls: while a script call is in flight the next
  // chunks wait here and go together in the next call (offsets follow the queue's order).
  const steps: Step[] = []
  let queuedBytes = 0
  let pumping = false
  let waiters: Array<() => void> = []
  const settled = (bytes: number): void => {
    queuedBytes -= bytes
    const wake = waiters
    waiters = []
    for (const fn of wake) fn()
  }
  const end = async (reason: 'done' | 'limit', message: string): Promise<void> => {
    const redis = await client()
    await endStream(redis, keys, queue, jobId, name, reason, message, limits.retentionSeconds, scriptRelay(redis, pubsub))
  }
  /** Stores `batch` (chunks only); hands back the ones after a limit error, to be tried again. */
  const store = async (batch: Chunk[]): Promise<Chunk[]> => {
    const redis = await client()
    const a = await appendChunks(redis, keys, queue, jobId, name, batch.map(c => c.json), limits, scriptRelay(redis, pubsub))
    for (let i = 0; i < a.stored; i++) batch[i].resolve(a.first + i)
    const rest = batch.slice(a.stored)
    if (a.code === 0 || rest.length === 0) return []
    if (a.code === APPENDED.gone) return failAll(rest, new Error(`job-progress: stream ${name}: job ${jobId} no longer exists`))
    if (a.code === APPENDED.ended) return failAll(rest, new StreamLimitError(`job-progress: stream ${name} has ended`))
    const message = a.code === APPENDED.chunks
      ? `stream ${name} reached maxChunks (${limits.maxChunks} chunks)`
      : `stream ${name} reached maxBytes (${limits.maxBytes} bytes)`
    // The chunk that crosses the limit gets the error (the ones before it are stored); the ones
    // after it are tried again and find the stream ended, as if each had been written alone.
    const crossing = rest.shift() as Chunk
    try {
      await end('limit', message)
    } finally {
      crossing.reject(new StreamLimitError(`job-progress: ${message}: ended, readers got a limit marker`))
    }
    return rest
  }
  const pump = async (): Promise<void> => {
    pumping = true
    while (steps.length > 0) {
      const head = steps[0]
      if (head.json === undefined) {
        steps.shift()
        await end('done', '').then(() => { head.resolve(0) }, head.reject)
        continue
      }
      let n = 1
      while (n < steps.length && n < APPEND_BATCH && steps[n].json !== undefined) n++
      const batch = steps.splice(0, n) as Chunk[]
      const again = await store(batch).catch((err: Error) => failAll(batch, err))
      steps.unshift(...again)
    }
    pumping = false
  }
  /** `failed` hears a failure before anything waiting for room wakes (pipe stops at once). */
  const push = async (step: { json?: string }, failed?: (err: Error) => void): Promise<number> => await new Promise<number>((resolve, reject) => {
    const bytes = step.json === undefined ? 0 : Buffer.byteLength(step.json)
    queuedBytes += bytes
    let open = true
    const once = <A>(fn: (a: A) => void) => (a: A): void => {
      if (!open) return
      open = false
      settled(bytes)
      fn(a)
    }
    steps.push({ json: step.json, resolve: once(resolve), reject: (err) => { if (open) failed?.(err); once(reject)(err) } })
    if (!pumping) void pump()
  })
  const encode = (chunk: unknown): { json: string, bytes: number } => {
    const json = JSON.stringify(chunk)
    if (json === undefined) throw new TypeError(`job-progress: stream ${name}: a chunk must be a string or a JSON value`)
    const bytes = Buffer.byteLength(json)
    if (bytes > limits.maxChunkBytes) throw new StreamLimitError(`job-progress: stream ${name}: a chunk of ${bytes} bytes is over maxChunkBytes (${limits.maxChunkBytes}); split it (the stream goes on)`)
    return { json, bytes }
  }
  const full = (bytes: number): boolean => queuedBytes > 0 && queuedBytes + bytes > limits.maxQueuedBytes
  const write = async (chunk: unknown): Promise<number> => {
    const { json, bytes } = encode(chunk)
    if (full(bytes)) throw new StreamBackpressureError(`job-progress: stream ${name}: ${queuedBytes} bytes wait to be stored, and this chunk of ${bytes} would pass maxQueuedBytes (${limits.maxQueuedBytes}); await write() or use pipe()`)
    return await push({ json })
  }
  return {
    name,
    write,
    async pipe (source) {
      const decoder = new TextDecoder()
      const iterable: AsyncIterable<unknown> = Symbol.asyncIterator in source ? source as AsyncIterable<unknown> : readerOf(source as ReadableStream<unknown>)
      // Chunks are queued without waiting for each to be stored, so they go to Redis in batches;
      // past maxQueuedBytes the loop waits for room: a source faster than Redis is slowed.
      let failed: Error | undefined
      let last: Promise<unknown> = Promise.resolve()
      const put = async (chunk: unknown): Promise<void> => {
        const { json, bytes } = encode(chunk)
        // A failed write sets `failed` and then wakes this wait.
        for (;;) {
          if (failed !== undefined) return
          if (!full(bytes)) break
          await new Promise<void>(resolve => { waiters.push(resolve) })
        }
        last = push({ json }, (err) => { failed ??= err }).catch(() => {})
      }
      try {
        for await (const chunk of iterable) {
          const text = chunk instanceof Uint8Array ? decoder.decode(chunk, { stream: true }) : chunk
          if (text !== '') await put(text)
          if (failed !== undefined) break
        }
        const rest = decoder.decode()
        if (rest !== '' && failed === undefined) await put(rest)
      } finally {
        await last
      }
      if (failed !== undefined) throw failed
    },
    async end () {
      await push({})
    }
  }
}

/** A chunk waiting to be stored (`json`), or the stream's end (no `json`). */
interface Step { json?: string, resolve: (offset: number) => void, reject: (err: Error) => void }
type Chunk = Step & { json: string }

function failAll (steps: Step[], err: Error): [] {
  for (const s of steps) s.reject(err)
  return []
}

async function * readerOf (stream: ReadableStream<unknown>): AsyncIterable<unknown> {
  const reader = stream.getReader()
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) return
      yield value
    }
  } finally {
    reader.releaseLock()
  }
}
