import type { Broker } from '../../broker/broker'
import { cutLine, type LogsRead } from './job-logs'
import type { LogLineMessage, LogMessage } from '../../wire/messages'
import { parseLogRelay } from '../../wire/relay'
import { Keys } from '../../core/keys'

/** What a watcher asks for: lines from an absolute offset, or (null) from the oldest line kept. */
export interface LogsRequest { from: number | null }

/** Reads a `logs` subscribe option (`true` or `{ from: <offset> }`); undefined when absent, null when malformed. */
export function parseLogsRequest (value: unknown): LogsRequest | undefined | null {
  if (value === undefined || value === false) return undefined
  if (value === true) return { from: null }
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const from = (value as Record<string, unknown>).from
    if (from === undefined) return { from: null }
    if (typeof from === 'number' && Number.isSafeInteger(from) && from >= 0) return { from }
  }
  return null
}

export interface LogFeedOptions {
  jobId: string
  request: LogsRequest
  /** Reads the job's log from an absolute offset (lib/channels/logs/job-logs.ts `readLogs`). */
  read: (from: number, limit: number) => Promise<LogsRead>
  send: (message: LogMessage) => void
  /** Bytes the watcher has not read yet (queued and unflushed). */
  backlog: () => number
  /** Over this backlog, lines are skipped and a `logs_truncated` marker says which. */
  maxBacklogBytes: number
  /** Most lines one catch-up sends; older ones are named in a marker. */
  maxCatchUpLines: number
  onError: (err: unknown) => void
}

/** A log line as watchers get it; lines over the limit (written with a plain `job.log()`) are cut. */
export function logLine (jobId: string, offset: number, line: string): LogLineMessage {
  return { type: 'log', job_id: jobId, offset, line: cutLine(line) ?? line, ts: Math.floor(Date.now() / 1000) }
}

/** How often a watcher that fell behind is checked for having caught up. */
const DRAIN_CHECK_MS = 50

/**
 * One watcher's log lines of one job: a catch-up from the job's log list, then the lines relayed
 * live, in offset order, each once. Lines relayed while a catch-up runs are already in the list
 * (the worker stores a line before it publishes it), so they are read again rather than kept; a
 * line that arrives past the next expected offset means one was lost on the way, and the list is
 * read again from there. A watcher that does not read (its backlog over the limit) gets no more
 * lines until it has caught up, then one `logs_truncated` naming the lines it missed: nothing is
 * dropped silently, and nothing grows without bound.
 */
export class LogFeed {
  readonly #o: LogFeedOptions
  /** The next offset the watcher needs; -1 until the first catch-up. */
  #next = -1
  #catching: Promise<void> | null = null
  /** Another read is needed once the one in flight ends. */
  #again = false
  /** The highest offset relayed while a read was in flight: re-read only if that read missed it. */
  #seen = -1
  #skippedFrom: number | null = null
  #timer: NodeJS.Timeout | null = null
  #closed = false

  constructor (opts: LogFeedOptions) {
    this.#o = opts
  }

  /** The next offset this watcher needs (for tests). */
  get next (): number {
    return this.#next
  }

  start (): void {
    void this.#catchUp()
  }

  /** Resolves once no catch-up read is in flight. */
  async idle (): Promise<void> {
    await this.#catching
  }

  /** Reads the list again from the next offset (after the subscriber reconnected). */
  resync (): void {
    if (!this.#closed && this.#next >= 0) void this.#catchUp()
  }

  /**
   * A line relayed on the job's channel; `message` is the same object for every watcher of the
   * line, so a protocol renders it once.
   */
  live (offset: number, line: string, message?: LogLineMessage): void {
    if (this.#closed) return
    if (this.#catching !== null || this.#next < 0) {
      if (offset > this.#seen) this.#seen = offset
      return
    }
    if (offset < this.#next) return
    if (offset > this.#next) {
      void this.#catchUp()
      return
    }
    this.#line(offset, line, message)
  }

  /** Once the job has ended: sends what is left in the list (a line can arrive after the final state). */
  async finish (): Promise<void> {
    await this.#catchUp()
    if (this.#skippedFrom !== null) this.#mark(this.#skippedFrom, this.#next)
  }

  close (): void {
    this.#closed = true
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
  }

  #line (offset: number, line: string, message?: LogLineMessage): void {
    if (this.#skippedFrom !== null || this.#o.backlog() > this.#o.maxBacklogBytes) {
      this.#skippedFrom ??= offset
      this.#timer ??= setInterval(() => this.#drained(), DRAIN_CHECK_MS).unref()
    } else {
      this.#o.send(message ?? logLine(this.#o.jobId, offset, line))
    }
    this.#next = offset + 1
  }

  #drained (): void {
    if (this.#closed || this.#skippedFrom === null || this.#o.backlog() > this.#o.maxBacklogBytes / 2) return
    this.#mark(this.#skippedFrom, this.#next)
  }

  #mark (from: number, next: number): void {
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
    this.#skippedFrom = null
    if (next > from) this.#o.send({ type: 'logs_truncated', job_id: this.#o.jobId, from, next, ts: Math.floor(Date.now() / 1000) })
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
          await this.#readOnce()
          // A read that found nothing new (the job is gone) ends the loop whatever was seen.
        } while ((this.#again || (this.#seen >= this.#next && this.#next > before)) && !this.#closed)
      } catch (err) {
        this.#o.onError(err)
      } finally {
        this.#catching = null
      }
    })()
    await this.#catching
  }

  async #readOnce (): Promise<void> {
    const cap = this.#o.maxCatchUpLines
    const asked = this.#next >= 0 ? this.#next : this.#o.request.from
    let page = await this.#o.read(asked ?? 0, cap)
    // More than a catch-up sends: the newest lines, and a marker for the older ones.
    if (page.total - page.from > cap) page = await this.#o.read(page.total - cap, cap)
    if (this.#closed) return
    if (asked === null) {
      if (page.from > page.first) this.#mark(page.first, page.from)
    } else if (page.from > asked) {
      this.#mark(asked, page.from)
    }
    if (this.#next < page.from) this.#next = page.from
    page.lines.forEach((line, i) => {
      const offset = page.from + i
      if (offset >= this.#next) this.#line(offset, line)
    })
    if (this.#next < 0) this.#next = page.from + page.lines.length
  }
}

/**
 * Every log feed of this instance, by job channel: reads the log messages the broker receives on
 * channels the hub already subscribes (a feed lives only while its watcher's subscription does),
 * so live logs cost no subscription and no read of their own.
 */
export class LiveLogs {
  readonly #feeds = new Map<string, Set<LogFeed>>()

  constructor (broker: Broker) {
    broker.onMessage((channel, raw) => this.#onMessage(channel, raw))
    // Lines published while the subscriber was away are gone from pub/sub, not from the list.
    broker.onRecover(() => {
      for (const feeds of this.#feeds.values()) for (const feed of feeds) feed.resync()
    })
  }

  add (channel: string, feed: LogFeed): () => void {
    let set = this.#feeds.get(channel)
    if (set === undefined) {
      set = new Set()
      this.#feeds.set(channel, set)
    }
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
    const relayed = parseLogRelay(raw)
    if (relayed === null) return
    const parsed = Keys.parseChannel(channel)
    const message = logLine(parsed?.jobId ?? '', relayed.o, relayed.l)
    for (const feed of feeds) feed.live(relayed.o, relayed.l, message)
  }
}
