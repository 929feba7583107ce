import type { Broker } from '../broker/broker'

/** How often a watcher that fell behind is checked for having caught up. */
const DRAIN_CHECK_MS = 50

/** What a feed needs of its watcher: where messages go, and how much it has not read yet. */
export interface OffsetFeedOptions {
  /** Bytes the watcher has not read yet (queued and unflushed). */
  backlog: () => number
  /** Over this backlog, items are skipped and, once the watcher has read, a marker names them. */
  maxBacklogBytes: number
  onError: (err: unknown) => void
}

/**
 * One watcher's items (log lines, stream chunks) of a list stored with absolute offsets: a
 * catch-up read from the list, then the items relayed live, in offset order, each once. Items
 * relayed while a read runs are in the list already (the writer stores an item before it
 * publishes it), so they are read again rather than kept; an item past the next expected offset
 * means one was lost on the way, and the list is read again from there. A watcher that does not
 * read (its backlog over the limit) gets nothing more until it has caught up, then one marker
 * naming what it missed: nothing is dropped silently, and nothing grows without bound.
 *
 * A subclass says how the list is read ({@link readOnce}) and what its messages are.
 */
export abstract class OffsetFeed<T, M> {
  protected readonly opts: OffsetFeedOptions
  /** The next offset the watcher needs; -1 until the first read (lines from the oldest kept). */
  #next: number
  #catching: Promise<void> | null = null
  /** Another read is needed once the one in flight ends. */
  #again = false
  /** The highest offset relayed while a read was in flight: read again only if that read missed it. */
  #seen = -1
  #skippedFrom: number | null = null
  #timer: NodeJS.Timeout | null = null
  #closed = false

  constructor (opts: OffsetFeedOptions, next: number) {
    this.opts = opts
    this.#next = next
  }

  /** The next offset this watcher needs. */
  get next (): number {
    return this.#next
  }

  protected get closed (): boolean {
    return this.#closed
  }

  /** Whether a catch-up read is in flight. */
  protected get catching (): boolean {
    return this.#catching !== null
  }

  /** One pass over the list from {@link next}: calls {@link item} for what it finds, in order. */
  protected abstract readOnce (): Promise<void>
  /** The message of an item, when no shared one was relayed. */
  protected abstract message (offset: number, item: T): M
  /** The marker naming the items `from`..`next - 1`, which were not sent. */
  protected abstract truncated (from: number, next: number): M
  protected abstract send (message: M): void
  /** After a catch-up, and once a watcher that fell behind has read: what else is due (a stream's end). */
  protected settled (): void {}

  start (): void {
    void this.catchUp()
  }

  /** Resolves once no catch-up read is in flight. */
  async idle (): Promise<void> {
    await this.#catching
  }

  /** Reads the list again from the next offset (after the subscriber reconnected). */
  resync (): void {
    if (!this.#closed && this.#next >= 0) void this.catchUp()
  }

  /** An item relayed on the job's channel; `message` is the same object for every watcher of it, so a protocol renders it once. */
  live (offset: number, item: T, message?: M): void {
    if (this.#closed) return
    if (this.#catching !== null || this.#next < 0) {
      if (offset > this.#seen) this.#seen = offset
      return
    }
    if (offset < this.#next) return
    if (offset > this.#next) {
      void this.catchUp()
      return
    }
    this.item(offset, item, message)
  }

  /** Once the job has ended: sends what is stored and not yet sent (items can come after the final state). */
  async finish (): Promise<void> {
    await this.catchUp()
    if (this.#skippedFrom !== null) this.mark(this.#skippedFrom, this.#next)
    this.settled()
  }

  close (): void {
    this.#closed = true
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
  }

  /** Whether items are being skipped: the watcher does not read. */
  protected get skipping (): boolean {
    return this.#skippedFrom !== null
  }

  /** Moves the next offset forward to `next` without sending (a read that starts later than asked). */
  protected skipTo (next: number): void {
    if (this.#next < next) this.#next = next
  }

  /**
   * Whether the watcher is over its backlog: if so, what remains up to `total` is skipped without
   * reading it, and the marker will name it all.
   */
  protected behind (total: number): boolean {
    if (this.#skippedFrom === null && this.opts.backlog() <= this.opts.maxBacklogBytes) return false
    this.#skip(this.#next)
    if (total > this.#next) this.#next = total
    return true
  }

  /** Item `offset` (the next one): sent, or skipped while the watcher does not read. */
  protected item (offset: number, item: T, message?: M): void {
    if (this.#skippedFrom !== null || this.opts.backlog() > this.opts.maxBacklogBytes) this.#skip(offset)
    else this.send(message ?? this.message(offset, item))
    this.#next = offset + 1
  }

  /** Sends the marker for `from`..`next - 1` (if not empty) and sends again from here on. */
  protected mark (from: number, next: number): void {
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
    this.#skippedFrom = null
    if (next > from) this.send(this.truncated(from, next))
  }

  #skip (from: number): void {
    this.#skippedFrom ??= from
    this.#timer ??= setInterval(() => this.#drained(), DRAIN_CHECK_MS).unref()
  }

  #drained (): void {
    if (this.#closed || this.#skippedFrom === null || this.opts.backlog() > this.opts.maxBacklogBytes / 2) return
    this.mark(this.#skippedFrom, this.#next)
    this.settled()
  }

  protected async catchUp (): Promise<void> {
    if (this.#catching !== null) {
      this.#again = true
      await this.#catching
      this.settled()
      return
    }
    this.#catching = (async () => {
      try {
        let before
        do {
          this.#again = false
          before = this.#next
          await this.readOnce()
          // A read that found nothing new (the job is gone) ends the loop whatever was seen.
        } while ((this.#again || (this.#seen >= this.#next && this.#next > before)) && !this.#closed)
      } catch (err) {
        this.opts.onError(err)
      } finally {
        this.#catching = null
      }
    })()
    await this.#catching
    this.settled()
  }
}

/**
 * Every feed of one kind (log lines, stream chunks) on this instance, by job channel: reads the
 * messages the broker receives on channels the hub already subscribes (a feed lives only while its
 * watcher's subscription does), so these feeds cost no subscription and no read of their own.
 * Items published while the subscriber was away are gone from pub/sub, not from the list: each
 * feed reads it again on recovery. A subclass turns a channel's message into its feeds' items.
 */
export abstract class OffsetFeeds<F extends OffsetFeed<unknown, unknown>> {
  readonly #feeds = new Map<string, Set<F>>()

  constructor (broker: Broker) {
    broker.onMessage((channel, raw) => {
      const feeds = this.#feeds.get(channel)
      if (feeds !== undefined) this.deliver(feeds, channel, raw)
    })
    broker.onRecover(() => {
      for (const feeds of this.#feeds.values()) for (const feed of feeds) feed.resync()
    })
  }

  /** Adds `feed` to `channel`'s; returns what closes it and removes it. */
  add (channel: string, feed: F): () => void {
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

  /** A message on a channel with feeds: what it means for them. */
  protected abstract deliver (feeds: ReadonlySet<F>, channel: string, raw: string): void
}
