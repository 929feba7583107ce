import { Keys } from '../../core/keys'
import { isStreamName, parseStreamRelay, type StreamChunkMessage, type StreamEndReason, type StreamMessage } from '../../wire/streams'
import type { StreamRead } from './stream-store'
import { OffsetFeed, OffsetFeeds, type OffsetFeedOptions } from '../offset-feed'

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

export interface StreamFeedOptions extends OffsetFeedOptions {
  jobId: string
  name: string
  from: number
  read: (from: number, limit: number) => Promise<StreamRead>
  send: (message: StreamMessage) => void
}

/** A stream watcher with more unread bytes than this (and at most half of `maxBufferedBytes`) skips chunks and gets `stream_truncated`. */
export const STREAM_BACKLOG_BYTES = 1024 * 1024

/** Chunks one catch-up read asks for. */
const PAGE = 500
const now = (): number => Math.floor(Date.now() / 1000)

/**
 * One watcher's chunks of one named stream ({@link OffsetFeed}, as for log lines): a catch-up from
 * the stored list, then the chunks relayed live, in offset order, each once. A watcher that does
 * not read gets no chunks until it has caught up, then one `stream_truncated` naming the ones it
 * missed, so memory never grows with a slow reader. `stream_end` comes after the last chunk.
 */
export class StreamFeed extends OffsetFeed<unknown, StreamMessage> {
  readonly #o: StreamFeedOptions
  #end: { offset: number, reason: StreamEndReason, message?: string } | null = null
  #ended = false

  constructor (opts: StreamFeedOptions) {
    super(opts, opts.from)
    this.#o = opts
  }

  get name (): string {
    return this.#o.name
  }

  live (offset: number, chunk: unknown, message?: StreamChunkMessage): void {
    if (!this.#ended) super.live(offset, chunk, message)
  }

  liveEnd (offset: number, reason: StreamEndReason, message?: string): void {
    if (this.closed || this.#ended) return
    this.#end = { offset, reason, ...(message !== undefined ? { message } : {}) }
    if (!this.catching && offset <= this.next) this.settled()
    else this.start()
  }

  protected message (offset: number, chunk: unknown): StreamMessage {
    return { type: 'stream', job_id: this.#o.jobId, name: this.#o.name, offset, chunk, ts: now() }
  }

  protected truncated (from: number, next: number): StreamMessage {
    return { type: 'stream_truncated', job_id: this.#o.jobId, name: this.#o.name, from, next, ts: now() }
  }

  protected send (message: StreamMessage): void {
    this.#o.send(message)
  }

  /** `stream_end`, once every chunk before it was sent or named in a marker. */
  protected settled (): void {
    const end = this.#end
    if (end === null || end.offset > this.next || this.#ended || this.skipping) return
    this.#ended = true
    this.#o.send({ type: 'stream_end', job_id: this.#o.jobId, name: this.#o.name, offset: end.offset, reason: end.reason, ...(end.message !== undefined ? { message: end.message } : {}), ts: now() })
  }

  protected async readOnce (): Promise<void> {
    for (;;) {
      if (this.closed) return
      const page = await this.#o.read(this.next, PAGE)
      if (this.closed) return
      if (page.end !== null) this.#end = page.end
      // Not reading: no point fetching what would be skipped; the marker names it all.
      if (this.behind(page.total)) return
      page.chunks.forEach((chunk, i) => {
        const offset = page.from + i
        if (offset >= this.next) this.item(offset, chunk)
      })
      if (page.chunks.length < PAGE) return
    }
  }
}

/** Every stream feed of this instance, by job channel (see {@link OffsetFeeds}). */
export class LiveStreams extends OffsetFeeds<StreamFeed> {
  protected deliver (feeds: ReadonlySet<StreamFeed>, channel: string, raw: string): void {
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
