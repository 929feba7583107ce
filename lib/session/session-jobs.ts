import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import { allowed, ownerOnly, type CanAccess, type Identity } from '../core/access'
import { isFinal, type JobEvent } from '../core/event'
import type { Hub, OpenedJob, Sink } from '../hub/hub'
import { isJobId } from '../core/keys'
import type { Outbox } from './outbox'
import type { ProtocolDefinition, ServerMessage } from '../protocols/types'
import type { SnapshotTarget } from '../core/snapshot'
import { CloseCodes, NOT_FOUND_REASON } from '../wire/close-codes'
import type { Transport } from './transport'
import { LogFeed, type LiveLogs, type LogsRequest } from '../channels/logs/live-logs'
import type { LogsRead } from '../channels/logs/job-logs'
import type { StreamsRequest } from '../channels/streams/live-streams'
import { StreamFeeds, type StreamsContext } from './stream-feed'
import { logBytes, renderOnce, serialize } from './render'
import { Subscription, Subscriptions, type Deliveries } from './subscriptions'
import { locate, quickly, type Located } from './locate'
import type { StepEnd } from './step-order'
import { SubscribeWaiter, type QuickOpens } from './subscribe-waiter'

/** What an open that attaches nothing hands back when it lets go. */
const NO_SINK: Sink = { deliver () {} }

/** Live logs, as every session of one plugin instance reaches them. */
export interface LogsContext {
  feeds: LiveLogs
  channel: (target: SnapshotTarget) => string
  read: (target: SnapshotTarget, from: number, limit: number) => Promise<LogsRead>
  maxBacklogBytes: number
  maxCatchUpLines: number
}

/** What a session's jobs read of what every session of one plugin instance shares. */
export interface JobsContext {
  hub: Hub
  /** The queue of a kind, or undefined for a kind we do not serve. */
  queueOf: (kind: string) => string | undefined
  /** Every kind served, with its queue: a bare job id (multiplexed protocols name no kind) is looked for in each. */
  kinds: Array<{ kind: string, queue: string }>
  /** The owners of jobs in one round trip, in order: null for a job that does not exist, an Error for a read Redis refused. */
  ownersOf: (targets: SnapshotTarget[]) => Promise<Array<string | null | Error>>
  maxSubscriptionsPerConnection: number
  /** Bytes a connection may leave unread (queued and unflushed) before it is closed. */
  maxBufferedBytes: number
  log: FastifyBaseLogger
  /** Who may watch a job besides its owner (`canAccess` option). */
  canAccess: CanAccess
  /** A job's owner, read alone; null when the job does not exist. */
  ownerOf: (target: SnapshotTarget) => Promise<string | null>
  logs?: LogsContext
  streams?: StreamsContext
}

/** What a session's jobs need of the connection they belong to: the session, read only. */
export interface JobsConnection {
  readonly protocol: ProtocolDefinition
  readonly outbox: Outbox
  readonly transport: Transport
  /** Authenticated and not closed: jobs may be opened and their states sent. */
  readonly serving: boolean
  readonly owner: string | null
  readonly identity: Identity | null
  /** The upgrade request, while an access policy of the application's may still ask about it. */
  readonly request: FastifyRequest | null
  sendControl: (message: ServerMessage) => void
  error: (message: string, jobId?: string) => void
  close: (code: number, reason: string) => void
}

/**
 * The jobs one session watches: subscribes (limits, ownership, the hub's open), unsubscribes, each
 * job's events to the outbox, its log lines when asked for, and the close of a close-on-final
 * connection once every job it watches has ended.
 */
export class SessionJobs implements Deliveries, QuickOpens {
  readonly #ctx: JobsContext
  readonly #c: JobsConnection
  readonly #subs = new Subscriptions()
  /** Subscribes asked for and not yet answered: a close-on-final connection waits for them. */
  #pending = 0
  /** Opens in flight, counted against the subscription limit. */
  #opening = 0

  constructor (ctx: JobsContext, connection: JobsConnection) {
    this.#ctx = ctx
    this.#c = connection
  }

  get size (): number {
    return this.#subs.size
  }

  /** Counts subscribes asked for: each is answered by a {@link subscribe} with `counted`. */
  expect (count: number): void {
    this.#pending += count
  }

  subscribe (jobId: unknown, kind: string | undefined, counted: boolean, logs?: LogsRequest, streams?: StreamsRequest): Promise<void> {
    const located = logs === undefined && streams === undefined ? this.#quickly(jobId, kind) : null
    if (located === null) return this.#subscribe(jobId, kind, counted, logs, streams)
    return new Promise<void>((resolve, reject) => this.#openQuickly(jobId as string, located, counted, { end: (err) => err === null ? resolve() : reject(err) }))
  }

  /**
   * A subscribe its session starts at once, when `steps` says nothing is to wait for: true when it
   * was (its end told to what `steps` gave), false when it takes the general path ({@link subscribe}).
   */
  subscribeNow (jobId: unknown, steps: { start: (jobId: string) => StepEnd | null }): boolean {
    const located = this.#quickly(jobId, undefined)
    const end = located === null ? null : steps.start(jobId as string)
    if (end === null) return false
    this.expect(1)
    try {
      this.#openQuickly(jobId as string, located as Located, true, end)
    } catch (err) {
      end.end(err)
    }
    return true
  }

  async #subscribe (jobId: unknown, kind: string | undefined, counted: boolean, logs?: LogsRequest, streams?: StreamsRequest): Promise<void> {
    try {
      // Most subscribes answer at once or open one new job: no async step of their own between.
      const opening = this.#open(jobId, kind, logs, streams)
      if (opening !== undefined) await opening
    } finally {
      if (counted) this.#pending--
      this.#closeIfDone()
    }
  }

  /**
   * Where a subscribe to a job new to this connection, without logs or streams, under the default
   * policy (or a watch token), may find it: the hub then tells a {@link SubscribeWaiter} how its
   * open went, and no async step waits across the two round trips. Null when the subscribe takes
   * the general path.
   */
  #quickly (jobId: unknown, kind: string | undefined): Located | null {
    const requester = this.#c.owner
    if (!this.#c.serving || requester === null || !isJobId(jobId) || !quickly(this.#ctx, this.#c) || this.#subs.get(jobId) !== undefined) return null
    if (this.#subs.size + this.#opening >= this.#ctx.maxSubscriptionsPerConnection) return null
    const located = locate(this.#ctx, this.#c, jobId, kind, requester)
    return located instanceof Promise ? null : located
  }

  #openQuickly (jobId: string, located: Located, counted: boolean, end: StepEnd): void {
    this.#opening++
    this.#ctx.hub.openEach(located.targets, located.expected, new SubscribeWaiter(this, jobId, located.targets, counted, end))
  }

  /** From a {@link SubscribeWaiter}: found at `target` (methods of the session's jobs, not closures made for each session). */
  adopt (jobId: string, target: SnapshotTarget, opened: OpenedJob): void {
    if (!this.#c.serving) return opened.detach(NO_SINK)
    this.#c.sendControl(this.#c.protocol.subscribed?.(jobId))
    const sub = new Subscription(opened, target, this)
    this.#subs.add(sub)
    opened.attach(sub.sink)
  }

  /** From a {@link SubscribeWaiter}: not found, or not the caller's. */
  missed (jobId: string): void {
    this.#notFound(jobId)
  }

  /** From a {@link SubscribeWaiter}: answered, whatever the outcome. */
  settled (counted: boolean): void {
    this.#opening--
    if (counted) this.#pending--
    this.#closeIfDone()
  }

  #notFound (jobId: unknown): void {
    if (this.#c.protocol.perJob === true) return this.#c.close(CloseCodes.forbidden, NOT_FOUND_REASON)
    const id = String(jobId).slice(0, 64)
    this.#c.error(`Job not found or access denied: ${id}`, id)
  }

  #open (jobId: unknown, kind?: string, logs?: LogsRequest, streams?: StreamsRequest): Promise<void> | undefined {
    if (!this.#c.serving) return
    if (!isJobId(jobId)) {
      this.#notFound(jobId)
      return
    }
    const existing = this.#subs.get(jobId)
    if (existing !== undefined) {
      const protocol = this.#c.protocol
      this.#c.sendControl(protocol.subscribed?.(jobId))
      const data = existing.last === null ? undefined : serialize(protocol.render(existing.last))
      if (data !== undefined && existing.last !== null) this.#c.outbox.send(data, jobId, isFinal(existing.last.state))
      if (logs !== undefined || streams !== undefined) return this.#restart(existing, logs, streams)
      return
    }
    if (this.#subs.size + this.#opening >= this.#ctx.maxSubscriptionsPerConnection) {
      this.#c.error(`Subscription limit reached: at most ${this.#ctx.maxSubscriptionsPerConnection} jobs per connection`, jobId)
      return
    }
    // Counted against the limit until #openNew settles (it gives it back itself).
    this.#opening++
    return this.#openNew(jobId, kind, logs, streams)
  }

  /** Asked again with logs or streams: they start over from the offsets now asked for. */
  async #restart (existing: Subscription, logs?: LogsRequest, streams?: StreamsRequest): Promise<void> {
    if (logs !== undefined) await this.#restartLogs(existing, existing.target, logs)
    if (streams !== undefined) await this.#restartStreams(existing, streams)
  }

  /** Opens a job new to this connection, counted in #opening until it settles. */
  async #openNew (jobId: string, kind?: string, logs?: LogsRequest, streams?: StreamsRequest): Promise<void> {
    try {
      const requester = this.#c.owner
      if (requester === null) return this.#notFound(jobId)
      const locating = locate(this.#ctx, this.#c, jobId, kind, requester)
      const located = locating instanceof Promise ? await locating : locating
      if (located === null) return this.#notFound(jobId)
      // Every place it may be, as one entry of the hub's batch: the first one found is kept.
      const found = await this.#ctx.hub.openAny(located.targets, located.expected)
      if (found === null) return this.#notFound(jobId)
      const target = located.targets[found.index]
      const opened = found.opened
      if (!this.#c.serving) {
        opened.detach(NO_SINK)
        return
      }
      const withLogs = logs !== undefined && await this.#allowed(target, 'logs')
      const withStreams = streams !== undefined && await this.#allowed(target, 'streams')
      if (!this.#c.serving) {
        opened.detach(NO_SINK)
        return
      }
      this.#c.sendControl(this.#c.protocol.subscribed?.(jobId))
      const sub = new Subscription(opened, target, this)
      this.#subs.add(sub)
      // The feed is in place before the current state is delivered: a job that has ended sends
      // its lines first, then its final state.
      if (withLogs) this.#feed(sub, target, logs)
      if (withStreams && streams !== undefined) sub.streams = this.#streamFeeds(target, streams)
      opened.attach(sub.sink)
      if (!sub.final && sub.logs !== undefined) {
        sub.logs.feed.start()
        // The job's next action waits for the catch-up: a client that subscribes and unsubscribes
        // in a loop gets one log read at a time, not one per message.
        await sub.logs.feed.idle()
      }
      if (!sub.final && sub.streams !== undefined) {
        sub.streams.start()
        await sub.streams.idle()
      }
    } finally {
      this.#opening--
    }
  }

  /**
   * Whether this connection may have a job's log lines or streams (both the `logs` action of an
   * access policy); says why not when it may not.
   */
  async #allowed (target: SnapshotTarget, what: 'logs' | 'streams'): Promise<boolean> {
    const name = what === 'logs' ? 'Logs' : 'Streams'
    if (this.#ctx[what] === undefined || this.#c.protocol[what] === undefined) {
      this.#c.error(`This connection serves no ${what}`, target.jobId)
      return false
    }
    const requester = this.#c.owner
    if (this.#c.identity?.via !== 'token' && this.#ctx.canAccess !== ownerOnly && requester !== null) {
      const owner = await this.#ctx.ownerOf(target)
      if (owner === null || !await allowed(this.#ctx.canAccess, this.#c.request as FastifyRequest, { kind: target.kind, jobId: target.jobId, owner, data: null }, 'logs', requester)) {
        this.#c.error(`${name} not available: ${target.jobId}`, target.jobId)
        return false
      }
    }
    return true
  }

  #streamFeeds (target: SnapshotTarget, request: StreamsRequest): StreamFeeds {
    return new StreamFeeds(this.#ctx.streams as StreamsContext, target, request, this.#c, this.#ctx.maxBufferedBytes, this.#ctx.log)
  }

  /** A subscription asked for streams again: they start over from the offsets now asked for. */
  async #restartStreams (sub: Subscription, request: StreamsRequest): Promise<void> {
    if (!await this.#allowed(sub.target, 'streams') || this.#subs.get(sub.target.jobId) !== sub) return
    await sub.streams?.idle()
    if (this.#subs.get(sub.target.jobId) !== sub) return
    sub.streams?.stop()
    await this.#rerun(sub, sub.streams = this.#streamFeeds(sub.target, request))
  }

  /** A subscription asked for lines again: they start over from the offset now asked for. */
  async #restartLogs (sub: Subscription, target: SnapshotTarget, request: LogsRequest): Promise<void> {
    if (!await this.#allowed(target, 'logs') || this.#subs.get(target.jobId) !== sub) return
    // The replaced feed's read in flight ends first: asking again and again costs one read at a time.
    await sub.logs?.feed.idle()
    if (this.#subs.get(target.jobId) !== sub) return
    await this.#rerun(sub, this.#feed(sub, target, request))
  }

  /** A feed started over: live while its job runs; once it has ended (its final state sent), what is left follows. */
  async #rerun (sub: Subscription, feed: { start: () => void, idle: () => Promise<void>, finish: () => Promise<void> }): Promise<void> {
    if (!sub.final) {
      feed.start()
      return await feed.idle()
    }
    this.#pending++
    feed.finish().finally(() => {
      this.#pending--
      this.#closeIfDone()
    })
  }

  /** Registers a subscription's log feed for live lines; the caller starts it. */
  #feed (sub: Subscription, target: SnapshotTarget, request: LogsRequest): LogFeed {
    const logs = this.#ctx.logs as LogsContext
    const c = this.#c
    const protocol = c.protocol
    const render = protocol.logs as NonNullable<ProtocolDefinition['logs']>
    sub.logs?.stop()
    const feed = new LogFeed({
      jobId: target.jobId,
      request,
      read: async (from, limit) => await logs.read(target, from, limit),
      send: (message) => {
        const bytes = logBytes(protocol, render, message)
        if (bytes !== undefined) c.outbox.send(bytes)
      },
      backlog: () => c.outbox.queuedBytes + c.transport.bufferedAmount,
      maxBacklogBytes: Math.min(logs.maxBacklogBytes, this.#ctx.maxBufferedBytes / 2),
      maxCatchUpLines: logs.maxCatchUpLines,
      onError: (err) => this.#ctx.log.warn({ err, jobId: target.jobId }, 'job-progress: cannot read a job\'s log for a watcher')
    })
    sub.logs = { feed, stop: logs.feeds.add(logs.channel(target), feed) }
    return feed
  }

  /** From a subscription: its job's next state. */
  deliver (sub: Subscription, event: JobEvent): void {
    if (sub.final) return
    sub.last = event
    const final = isFinal(event.state)
    if (final && (sub.logs !== undefined || sub.streams !== undefined)) {
      // A job's last lines and chunks can be relayed after its final state: what is left of its
      // log and streams is read and sent first, so a watcher that has the final state has them all.
      sub.final = true
      this.#pending++
      Promise.all([sub.logs?.feed.finish(), sub.streams?.finish()]).finally(() => {
        this.#pending--
        this.#send(sub, event, true)
        this.#closeIfDone()
      })
      return
    }
    this.#send(sub, event, final)
    if (!final) return
    sub.final = true
    this.#closeIfDone()
  }

  #send (sub: Subscription, event: JobEvent, final: boolean): void {
    const { text, bytes } = renderOnce(this.#c.protocol, event)
    // Two events can render alike (queued and active are both `processing 0/0` in seed 000's
    // format): the client learns nothing from the second.
    if (text !== undefined && bytes !== undefined && (final || text !== sub.sent)) {
      sub.sent = text
      this.#c.outbox.send(bytes, event.jobId, final)
    }
  }

  /**
   * A close-on-final connection ends once every job it watches has ended and no subscribe is
   * still to be answered: a finished job and a running one subscribed in one write must not
   * close it after the first.
   */
  #closeIfDone (): void {
    if (this.#c.protocol.closeOnFinal !== true || !this.#c.serving || this.#pending > 0 || this.#subs.size === 0) return
    for (const sub of this.#subs.values()) if (!sub.final) return
    this.#c.outbox.closeWhenFlushed(CloseCodes.normal, 'job finished')
  }

  async unsubscribe (jobId: unknown): Promise<void> {
    if (typeof jobId !== 'string') return
    const sub = this.#subs.get(jobId)
    if (sub !== undefined) {
      this.#subs.delete(jobId)
      sub.logs?.stop()
      sub.streams?.stop()
      sub.opened.detach(sub.sink)
    }
    this.#c.sendControl(this.#c.protocol.unsubscribed?.(jobId))
    this.#closeIfDone()
  }

  /** The connection is gone: every job and its lines are let go. */
  close (): void {
    for (const sub of this.#subs.values()) {
      sub.logs?.stop()
      sub.streams?.stop()
      sub.opened.detach(sub.sink)
    }
    this.#subs.clear()
  }
}
