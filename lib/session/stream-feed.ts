import type { FastifyBaseLogger } from 'fastify'
import type { SnapshotTarget } from '../core/snapshot'
import { StreamFeed, type LiveStreams, type StreamsRequest } from '../channels/streams/live-streams'
import type { StreamRead } from '../channels/streams/stream-store'
import type { ProtocolDefinition } from '../protocols/types'
import type { StreamMessage } from '../wire/streams'
import type { Outbox } from './outbox'
import type { Transport } from './transport'
import { serialize } from './render'

/** Named streams, as every session of one plugin instance reaches them. */
export interface StreamsContext {
  feeds: LiveStreams
  channel: (target: SnapshotTarget) => string
  read: (target: SnapshotTarget, name: string, from: number, limit: number) => Promise<StreamRead>
  /** A stream watcher with more unread than this skips chunks and gets `stream_truncated`. */
  maxBacklogBytes: number
}

/** What the feeds need of their connection. */
export interface StreamsConnection {
  readonly protocol: ProtocolDefinition
  readonly outbox: Outbox
  readonly transport: Transport
}

/** A live chunk goes to every watcher of its job as one object: rendered and encoded once per protocol. */
const rendered = new WeakMap<ProtocolDefinition, { message: StreamMessage, bytes: Buffer | undefined }>()
function streamBytes (protocol: ProtocolDefinition, message: StreamMessage): Buffer | undefined {
  const last = rendered.get(protocol)
  if (last !== undefined && last.message === message) return last.bytes
  const text = serialize(protocol.streams?.(message))
  const bytes = text === undefined ? undefined : Buffer.from(text)
  rendered.set(protocol, { message, bytes })
  return bytes
}

/**
 * One subscription's streams: a feed per name, each registered for live chunks before its
 * catch-up starts, so no chunk falls between. Chunks go to the outbox's unconflated path (like
 * log lines), bounded by the feed's backlog limit, never to the per-job latest-state slot.
 */
export class StreamFeeds {
  readonly #feeds: StreamFeed[] = []
  readonly #stops: Array<() => void> = []

  constructor (ctx: StreamsContext, target: SnapshotTarget, request: StreamsRequest, c: StreamsConnection, maxBufferedBytes: number, log: FastifyBaseLogger) {
    for (const [name, from] of Object.entries(request)) {
      const feed = new StreamFeed({
        jobId: target.jobId,
        name,
        from,
        read: async (offset, limit) => await ctx.read(target, name, offset, limit),
        send: (message) => {
          const bytes = streamBytes(c.protocol, message)
          if (bytes !== undefined) c.outbox.send(bytes)
        },
        backlog: () => c.outbox.queuedBytes + c.transport.bufferedAmount,
        maxBacklogBytes: Math.min(ctx.maxBacklogBytes, maxBufferedBytes / 2),
        onError: (err) => log.warn({ err, jobId: target.jobId, stream: name }, 'job-progress: cannot read a job\'s stream for a watcher')
      })
      this.#feeds.push(feed)
      this.#stops.push(ctx.feeds.add(ctx.channel(target), feed))
    }
  }

  start (): void {
    for (const feed of this.#feeds) feed.start()
  }

  async idle (): Promise<void> {
    await Promise.all(this.#feeds.map(async feed => await feed.idle()))
  }

  /** The job has ended: what is stored and not yet sent goes out before its final state. */
  async finish (): Promise<void> {
    await Promise.all(this.#feeds.map(async feed => await feed.finish()))
  }

  stop (): void {
    for (const stop of this.#stops) stop()
  }
}
