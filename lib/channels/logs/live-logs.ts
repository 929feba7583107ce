import { cutLine, type LogsRead } from './job-logs'
import type { LogLineMessage, LogMessage } from '../../wire/messages'
import { parseLogRelay } from '../../wire/relay'
import { Keys } from '../../core/keys'
import { OffsetFeed, OffsetFeeds, type OffsetFeedOptions } from '../offset-feed'

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

export interface LogFeedOptions extends OffsetFeedOptions {
  jobId: string
  request: LogsRequest
  /** Reads the job's log from an absolute offset (lib/channels/logs/job-logs.ts `readLogs`). */
  read: (from: number, limit: number) => Promise<LogsRead>
  send: (message: LogMessage) => void
  /** Most lines one catch-up sends; older ones are named in a marker. */
  maxCatchUpLines: number
}

/** A log line as watchers get it; lines over the limit (written with a plain `job.log()`) are cut. */
export function logLine (jobId: string, offset: number, line: string): LogLineMessage {
  return { type: 'log', job_id: jobId, offset, line: cutLine(line) ?? line, ts: Math.floor(Date.now() / 1000) }
}

/**
 * One watcher's log lines of one job ({@link OffsetFeed}): a catch-up from the job's log list of at
 * most `maxCatchUpLines` (a `logs_truncated` names older lines), then the lines relayed live, in
 * offset order, each once; a watcher that does not read gets one `logs_truncated` once it has.
 */
export class LogFeed extends OffsetFeed<string, LogMessage> {
  readonly #o: LogFeedOptions

  constructor (opts: LogFeedOptions) {
    super(opts, -1)
    this.#o = opts
  }

  protected message (offset: number, line: string): LogMessage {
    return logLine(this.#o.jobId, offset, line)
  }

  protected truncated (from: number, next: number): LogMessage {
    return { type: 'logs_truncated', job_id: this.#o.jobId, from, next, ts: Math.floor(Date.now() / 1000) }
  }

  protected send (message: LogMessage): void {
    this.#o.send(message)
  }

  protected async readOnce (): Promise<void> {
    const cap = this.#o.maxCatchUpLines
    const asked = this.next >= 0 ? this.next : this.#o.request.from
    let page = await this.#o.read(asked ?? 0, cap)
    // More than a catch-up sends: the newest lines, and a marker for the older ones.
    if (page.total - page.from > cap) page = await this.#o.read(page.total - cap, cap)
    if (this.closed) return
    if (asked === null) {
      if (page.from > page.first) this.mark(page.first, page.from)
    } else if (page.from > asked) {
      this.mark(asked, page.from)
    }
    this.skipTo(page.from)
    page.lines.forEach((line, i) => {
      const offset = page.from + i
      if (offset >= this.next) this.item(offset, line)
    })
  }
}

/** Every log feed of this instance, by job channel (see {@link OffsetFeeds}). */
export class LiveLogs extends OffsetFeeds<LogFeed> {
  protected deliver (feeds: ReadonlySet<LogFeed>, channel: string, raw: string): void {
    const relayed = parseLogRelay(raw)
    if (relayed === null) return
    const message = logLine(Keys.parseChannel(channel)?.jobId ?? '', relayed.o, relayed.l)
    for (const feed of feeds) feed.live(relayed.o, relayed.l, message)
  }
}
