import type { Broker } from '../../broker/broker'
import { Keys } from '../../core/keys'
import { isStreamName, parseStreamRelay, type StreamChunkMessage, type StreamEndReason, type StreamMessage } from '../../wire/streams'
import type { StreamRead } from './stream-store'

/** What a watcher asks for: each named stream from an absolute offset. */
export type StreamsRequest = Record<string, number>

/** Most streams one subscription may follow. */
export const MAX_STREAMS_PER_JOB = 16

/** Reads a `streams` subscribe option (`{ <name>: <from offset> }`); undefined when absent, null when malformed. */
export function parseStreamsRequest (value: unknown): StreamsRequest | undefined | null {
  if (value === undefined) return undefined
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return null
  const entries = Object.entries(value as Record<string, unknown>)
  if (entries.length > MAX_STREAMS_PER_JOB) return null
  const out: StreamsRequest = {}
  for (const [name, from] of entries) {
    if (!isStreamName(name) || typeof from !== 'number' || !Number.isSafeInteger(from) || from < 0) return null
    out[name] = from
  }
  return out
}

export interface StreamFeedOptions {
  jobId: string
  name: string
  from: number
  read: (from: number, limit: number) => Promise<StreamRead>
  send: (message: StreamMessage) => void
  /** Bytes the watcher has not read yet (queued and unflushed). */
  backlog: () => number
  /** Over this backlog, chunks are skipped and a `stream_truncated` marker says which. */
  maxBacklogBytes: number
  onError: (err: unknown) => void
}

/** A stream watcher with more unread bytes than this (and at most half of `maxBufferedBytes`) skips chunks and gets `stream_truncated`. */
export const STREAM_BACKLOG_BYTES = 1024 * 1024

/** Chunks one catch-up read asks for. */
const PAGE = 500
const DRAIN_CHECK_MS = 50
const now = (): number => Math.floor(Date.now() / 1000)

/**
 * One watcher's chunks of one named stream, as {@link LogFeed} does for log lines: a catch-up from
 * the stored list, then the chunks relayed live, in offset order, each once; a chunk past the next
 * expected offset means one was lost on the way, and the list is read again from there. A watcher
 * that does not read gets no chunks until it has caught up, then one `stream_truncated` naming the
 * ones it missed, so memory never grows with a slow reader. `stream_end` comes after the last chunk.
 */
export class StreamFeed {
  readonly #o: StreamFeedOptions
  #next: number
  #catching: Promise<void> | null = null
  #again = false
  #seen = -1
  #skippedFrom: number | null = null
  #end: { offset: number, reason: StreamEndReason, message?: string } | null = null
  #ended = false
  #timer: NodeJS.Timeout | null = null
  #closed = false

  constructor (opts: StreamFeedOptions) {
    this.#o = opts
    this.#next = opts.from
  }

  get next (): number {
    return this.#next
  }

  get name (): string {
    return this.#o.name
  }

  start (): void {
    void this.#catchUp()
  }

  async idle (): Promise<void> {
    await this.#catching
  }

  resync (): void {
    if (!this.#closed) void this.#catchUp()
  }

  live (offset: number, chunk: unknown, message?: StreamChunkMessage): void {
    if (this.#closed || this.#ended) return
    if (this.#catching !== null) {
      if (offset > this.#seen) this.#seen = offset
      return
    }
    if (offset < this.#next) return
    if (offset > this.#next) return this.start()
    this.#chunk(offset, chunk, message)
  }

  liveEnd (offset: number, reason: StreamEndReason, message?: string): void {
    if (this.#closed || this.#ended) return
    this.#end = { offset, reason, ...(message !== undefined ? { message } : {}) }
    if (this.#catching === null && offset <= this.#next) this.#sendEnd()
    else this.start()
  }

  /** Once the job has ended: sends what is stored and not yet sent (chunks can come after the final state). */
  async finish (): Promise<void> {
    await this.#catchUp()
    if (this.#skippedFrom !== null) this.#mark(this.#skippedFrom, this.#next)
    if (this.#end !== null && this.#end.offset <= this.#next) this.#sendEnd()
  }

  close (): void {
    this.#closed = true
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
  }

  #chunk (offset: number, chunk: unknown, message?: StreamChunkMessage): void {
    if (this.#skippedFrom !== null || this.#o.backlog() > this.#o.maxBacklogBytes) {
      this.#skippedFrom ??= offset
      this.#timer ??= setInterval(() => this.#drained(), DRAIN_CHECK_MS).unref()
    } else {
      this.#o.send(message ?? { type: 'stream', job_id: this.#o.jobId, name: this.#o.name, offset, chunk, ts: now() })
    }
    this.#next = offset + 1
  }

  #drained (): void {
    if (this.#closed || this.#skippedFrom === null || this.#o.backlog() > this.#o.maxBacklogBytes / 2) return
    this.#mark(this.#skippedFrom, this.#next)
    if (this.#end !== null && this.#end.offset <= this.#next) this.#sendEnd()
  }

  #mark (from: number, next: number): void {
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
    this.#skippedFrom = null
    if (next > from) this.#o.send({ type: 'stream_truncated', job_id: this.#o.jobId, name: this.#o.name, from, next, ts: now() })
  }

  #sendEnd (): void {
    const end = this.#end
    if (end === null || this.#ended || this.#skippedFrom !== null) return
    this.#ended = true
    this.#o.send({ type: 'stream_end', job_id: this.#o.jobId, name: this.#o.name, offset: end.offset, reason: end.reason, ...(end.message !== undefined ? { message: end.message } : {}), ts: now() })
  }

  async #catchUp (): Promise<void> {
    if (this.#catching !== null) {
      this.#again = true
      return await this.#catching
    }
    this.#catching = (async () => {
      try {
        let before
        do {
          this.#again = false
          before = this.#next
          await this.#readAll()
        } while ((this.#again || (this.#seen >= this.#next && this.#next > before)) && !this.#closed)
      } catch (err) {
        this.#o.onError(err)
      } finally {
        this.#catching = null
      }
    })()
    await this.#catching
    if (this.#end !== null && this.#end.offset <= this.#next) this.#sendEnd()
  }

  async #readAll (): Promise<void> {
    for (;;) {
      if (this.#closed) return
      const page = await this.#o.read(this.#next, PAGE)
      if (this.#closed) return
      if (page.end !== null) this.#end = page.end
      if (this.#skippedFrom !== null || this.#o.backlog() > this.#o.maxBacklogBytes) {
        // Not reading: no point fetching what would be skipped; the marker names it all.
        this.#skippedFrom ??= this.#next
        if (page.total > this.#next) this.#next = page.total
        this.#timer ??= setInterval(() => this.#drained(), DRAIN_CHECK_MS).unref()
        return
      }
      page.chunks.forEach((chunk, i) => {
        const offset = page.from + i
        if (offset >= this.#next) this.#chunk(offset, chunk)
      })
      if (page.chunks.length < PAGE) return
    }
  }
}

/**
 * Every stream feed of this instance, by job channel: reads the stream messages the broker
 * receives on channels the hub already subscribes, as live logs do, so streams cost no
 * subscription and no read of their own.
 */
export class LiveStreams {
  readonly #feeds = new Map<string, Set<StreamFeed>>()

  constructor (broker: Broker) {
    broker.onMessage((channel, raw) => this.#onMessage(channel, raw))
    broker.onRecover(() => {
      for (const feeds of this.#feeds.values()) for (const feed of feeds) feed.resync()
    })
  }

  add (channel: string, feed: StreamFeed): () => void {
    let set = this.#feeds.get(channel)
    if (set === undefined) this.#feeds.set(channel, set = new Set())
    set.add(feed)
    return () => {
      feed.close()
      const s = this.#feeds.get(channel)
      if (s === undefined) return
      s.delete(feed)
      if (s.size === 0) this.#feeds.delete(channel)
    }
  }

  #onMessage (channel: string, raw: string): void {
    const feeds = this.#feeds.get(channel)
    if (feeds === undefined) return
    const relayed = parseStreamRelay(raw)
    if (relayed === null) return
    const jobId = Keys.parseChannel(channel)?.jobId ?? ''
    if ('end' in relayed) {
      for (const feed of feeds) if (feed.name === relayed.name) feed.liveEnd(relayed.offset, relayed.end, relayed.message)
      return
    }
    // One message object for every watcher of the chunk.
    const message: StreamChunkMessage = { type: 'stream', job_id: jobId, name: relayed.name, offset: relayed.offset, chunk: relayed.chunk, ts: now() }
    for (const feed of feeds) if (feed.name === relayed.name) feed.live(relayed.offset, relayed.chunk, message)
  }
}
