import type { Redis } from 'ioredis'
import { scriptRelay } from '../broker/create-broker'
import { Keys } from '../core/keys'
import { APPENDED, STREAM_LIMITS, appendChunk, endStream, readStream, type StreamLimits, type StreamRead } from '../channels/streams/stream-store'
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

/** A named stream of one job, written in order: chunks are strings or JSON values. */
export interface JobStream {
  readonly name: string
  /** Stores a chunk, relays it to the stream's watchers, and returns its offset. */
  write: (chunk: unknown) => Promise<number>
  /** Writes every chunk of `source` (bytes are decoded as UTF-8 text), in order; does not end the stream. */
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
  // Writes are chained, so offsets follow the order of the calls even when they are not awaited.
  let tail: Promise<unknown> = Promise.resolve()
  const chain = async <T>(step: () => Promise<T>): Promise<T> => {
    const next = tail.then(step, step)
    tail = next.catch(() => {})
    return await next
  }
  const end = async (reason: 'done' | 'limit', message: string): Promise<void> => {
    const redis = await client()
    await endStream(redis, keys, queue, jobId, name, reason, message, limits.retentionSeconds, scriptRelay(redis, pubsub))
  }
  const write = async (chunk: unknown): Promise<number> => {
    const json = JSON.stringify(chunk)
    if (json === undefined) throw new TypeError(`job-progress: stream ${name}: a chunk must be a string or a JSON value`)
    const bytes = Buffer.byteLength(json)
    if (bytes > limits.maxChunkBytes) throw new StreamLimitError(`job-progress: stream ${name}: a chunk of ${bytes} bytes is over maxChunkBytes (${limits.maxChunkBytes}); split it (the stream goes on)`)
    return await chain(async () => {
      const redis = await client()
      const offset = await appendChunk(redis, keys, queue, jobId, name, json, limits, scriptRelay(redis, pubsub))
      if (offset >= 0) return offset
      if (offset === APPENDED.gone) throw new Error(`job-progress: stream ${name}: job ${jobId} no longer exists`)
      if (offset === APPENDED.ended) throw new StreamLimitError(`job-progress: stream ${name} has ended`)
      const message = offset === APPENDED.chunks
        ? `stream ${name} reached maxChunks (${limits.maxChunks} chunks)`
        : `stream ${name} reached maxBytes (${limits.maxBytes} bytes)`
      await end('limit', message)
      throw new StreamLimitError(`job-progress: ${message}: ended, readers got a limit marker`)
    })
  }
  return {
    name,
    write,
    async pipe (source) {
      const decoder = new TextDecoder()
      const iterable: AsyncIterable<unknown> = Symbol.asyncIterator in source ? source as AsyncIterable<unknown> : readerOf(source as ReadableStream<unknown>)
      for await (const chunk of iterable) {
        const text = chunk instanceof Uint8Array ? decoder.decode(chunk, { stream: true }) : chunk
        if (text !== '') await write(text)
      }
      const rest = decoder.decode()
      if (rest !== '') await write(rest)
    },
    async end () {
      await chain(async () => await end('done', ''))
    }
  }
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
