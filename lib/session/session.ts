import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import { allowed, ownerOnly, type Authenticator, type CanAccess, type Identity } from '../core/access'
import { UnauthorizedError } from '../errors'
import { isFinal, type JobEvent } from '../core/event'
import type { ConnectionLimit } from './connection-limit'
import type { Hub, OpenedJob, Sink } from '../hub/hub'
import { isJobId } from '../core/keys'
import { Outbox } from './outbox'
import type { ClientAction, ProtocolDefinition, ServerMessage } from '../protocols/types'
import type { SnapshotTarget } from '../core/snapshot'
import { CloseCodes, closeReason, NOT_FOUND_REASON } from '../wire/close-codes'
import type { Transport, TransportEvents } from './transport'
import { LogFeed, type LiveLogs, type LogsRequest } from '../channels/logs/live-logs'
import type { LogsRead } from '../channels/logs/job-logs'
import type { LogMessage, MyJobMessage, MyJobsResyncMessage } from '../wire/messages'

/** Live logs, as every session of one plugin instance reaches them. */
export interface LogsContext {
  feeds: LiveLogs
  channel: (target: SnapshotTarget) => string
  read: (target: SnapshotTarget, from: number, limit: number) => Promise<LogsRead>
  maxBacklogBytes: number
  maxCatchUpLines: number
}

/** The caller's jobs feed: `watch` calls `receive` with each message until the returned stop. */
export interface MineContext {
  watch: (owner: string, receive: (message: MyJobMessage | MyJobsResyncMessage, raw: string) => void) => Promise<() => void>
}

/** What every session of one plugin instance shares. */
export interface SessionContext {
  hub: Hub
  owners: Authenticator
  /** The queue of a kind, or undefined for a kind we do not serve. */
  queueOf: (kind: string) => string | undefined
  /** Finds which kind a bare job id belongs to (multiplexed protocols name no kind). */
  findKind: (jobId: string) => Promise<string | null>
  sessions: Set<Session>
  /** Connections per owner, counted across every instance. */
  connectionLimit: ConnectionLimit
  maxConnectionsPerOwner: number
  maxSubscriptionsPerConnection: number
  maxPayload: number
  /** Bytes a connection may leave unread (queued and unflushed) before it is closed. */
  maxBufferedBytes: number
  firstMessageTimeoutMs: number
  log: FastifyBaseLogger
  /** Who may watch a job besides its owner (`canAccess` option). */
  canAccess: CanAccess
  /** A job's owner, read alone; null when the job does not exist. */
  ownerOf: (target: SnapshotTarget) => Promise<string | null>
  logs?: LogsContext
  mine?: MineContext
}

/** A job a session starts with (named by the route, not by a client message). */
export interface InitialJob { kind?: string, jobId: string, logs?: LogsRequest }

/**
 * One subscribed job of a session, and the sink its events come to: an object with a method, not
 * a closure per subscription (a storm makes thousands, kept while they last).
 */
class Subscription implements Sink {
  readonly opened: OpenedJob
  readonly target: SnapshotTarget
  readonly #session: Session
  final = false
  /** The last event delivered, so a repeated subscribe answers with the current state too. */
  last: JobEvent | null = null
  /** The last message sent for it. */
  sent?: string
  /** Its log lines, when asked for. */
  logs?: { feed: LogFeed, stop: () => void }

  constructor (opened: OpenedJob, target: SnapshotTarget, session: Session) {
    this.opened = opened
    this.target = target
    this.#session = session
  }

  /** Where the hub delivers this job's events: the subscription itself. */
  get sink (): Sink {
    return this
  }

  deliver (event: JobEvent): void {
    deliverTo(this.#session, this, event)
  }
}

/**
 * A session's subscriptions by job id. Most connections watch one job (the per-job route, an SSE
 * stream of one job): that one is held as it is, and a map is made only for a second one.
 */
class Subscriptions {
  #one: Subscription | null = null
  #many: Map<string, Subscription> | null = null

  get size (): number {
    return this.#many !== null ? this.#many.size : this.#one === null ? 0 : 1
  }

  get (jobId: string): Subscription | undefined {
    if (this.#many !== null) return this.#many.get(jobId)
    return this.#one?.target.jobId === jobId ? this.#one : undefined
  }

  /** Adds `sub` under its job's id, in place of one there. */
  add (sub: Subscription): void {
    const jobId = sub.target.jobId
    if (this.#many === null) {
      if (this.#one === null || this.#one.target.jobId === jobId) {
        this.#one = sub
        return
      }
      this.#many = new Map([[this.#one.target.jobId, this.#one]])
      this.#one = null
    }
    this.#many.set(jobId, sub)
  }

  delete (jobId: string): void {
    if (this.#many !== null) this.#many.delete(jobId)
    else if (this.#one?.target.jobId === jobId) this.#one = null
  }

  values (): Iterable<Subscription> {
    return this.#many !== null ? this.#many.values() : this.#one === null ? [] : [this.#one]
  }

  clear (): void {
    this.#one = null
    this.#many = null
  }
}

const serialize = (message: ServerMessage): string | undefined =>
  message === undefined ? undefined : typeof message === 'string' ? message : JSON.stringify(message)

/**
 * The hub hands the same event object to every session watching the job, one after the other:
 * render and serialize it once per protocol, not once per session.
 */
interface Rendered { event: JobEvent, text: string | undefined, bytes: Buffer | undefined }
const rendered = new WeakMap<ProtocolDefinition, Rendered>()
function renderOnce (protocol: ProtocolDefinition, event: JobEvent): Rendered {
  const last = rendered.get(protocol)
  if (last !== undefined && last.event === event) return last
  const text = serialize(protocol.render(event))
  // Encoded once too: the transport would otherwise turn the same string into bytes for each.
  const next = { event, text, bytes: text === undefined ? undefined : Buffer.from(text) }
  rendered.set(protocol, next)
  return next
}

/** A live log line goes to every watcher of its job as one object: rendered and encoded once per protocol. */
const renderedLog = new WeakMap<ProtocolDefinition, { message: LogMessage, bytes: Buffer | undefined }>()
function logBytes (protocol: ProtocolDefinition, render: (m: LogMessage) => ServerMessage, message: LogMessage): Buffer | undefined {
  const last = renderedLog.get(protocol)
  if (last !== undefined && last.message === message) return last.bytes
  const text = serialize(render(message))
  const bytes = text === undefined ? undefined : Buffer.from(text)
  renderedLog.set(protocol, { message, bytes })
  return bytes
}

/**
 * How a subscription hands its events to its session's private method: one function set by the
 * class, not a closure per session.
 */
let deliverTo: (session: Session, sub: Subscription, event: JobEvent) => void

const RESOLVED = Promise.resolve()

/**
 * One client connection under one protocol, over any transport: authenticates it, checks
 * ownership before any job data leaves, subscribes its jobs through the hub, and applies the
 * limits. The protocol only renders; the transport only carries.
 *
 * Most connections sit idle for most of their life, and a server holds thousands: what a session
 * keeps is made when it is first needed (a map of waiting steps, a list of early messages), and
 * what only its start needs (the upgrade request) is let go once it cannot be asked for again.
 */
export class Session implements TransportEvents {
  readonly transport: Transport
  readonly outbox: Outbox
  readonly protocol: ProtocolDefinition
  owner: string | null = null
  #identity: Identity | null = null
  readonly #ctx: SessionContext
  /** Kept while an access policy of the application's may still be asked about it (see {@link #forgetRequest}). */
  #request: FastifyRequest | null
  readonly #subs = new Subscriptions()
  #state: 'auth' | 'ready' | 'closed' = 'auth'
  #chain: Promise<void> = RESOLVED
  /** Messages that arrived before authentication ended. */
  #early: string[] | null = null
  #authTimer: NodeJS.Timeout | null = null
  /** Subscribes asked for and not yet answered: a close-on-final connection waits for them. */
  #pending = 0
  /** Stops the caller's jobs feed, while subscribed. */
  #mine: (() => void) | null = null
  #wantsMine: boolean
  /** Per job, its subscribes in the order asked: jobs do not wait on each other. */
  #jobChains: Map<string, Promise<void>> | null = null
  /** The last unsubscribe: steps asked after it wait for it. */
  #barrier: Promise<void> | null = null
  /** Opens in flight, counted against the subscription limit. */
  #opening = 0

  /** Call synchronously from the route handler: messages that arrive before auth ends are kept. */
  constructor (ctx: SessionContext, protocol: ProtocolDefinition, transport: Transport, request: FastifyRequest, jobs: InitialJob[] = [], mine = false) {
    this.#ctx = ctx
    this.#wantsMine = mine
    this.protocol = protocol
    this.transport = transport
    this.#request = request
    this.outbox = new Outbox(transport, { maxBytes: ctx.maxBufferedBytes, owner: this })
    ctx.sessions.add(this)
    transport.bind(this)
    if (protocol.auth === 'first-message') {
      this.#forgetRequest()
      this.#authTimer = setTimeout(() => this.#refuse('authentication timeout: send {"token": "..."} first'), ctx.firstMessageTimeoutMs).unref()
    } else {
      this.#pending += jobs.length
      this.#enqueue(() => this.#authenticate(jobs))
    }
  }

  get subscriptions (): number {
    return this.#subs.size
  }

  /**
   * Sends a message that is never conflated (connected, errors, heartbeats ...). As bytes, like
   * events: a WebSocket then writes every frame of a turn of the event loop at its end in one
   * system call (a subscribe's `subscribed` and its first state go out together).
   */
  sendControl (message: ServerMessage): void {
    const data = serialize(message)
    if (data !== undefined) this.outbox.send(Buffer.from(data))
  }

  close (code: number, reason: string): void {
    this.transport.close(code, closeReason(code, reason))
    this.#cleanup()
  }

  /** From the transport: a client message. */
  received (data: Buffer | string, isBinary: boolean, size: number): void {
    this.#onFrame(data, isBinary, size)
  }

  /** From the transport: the connection is gone. */
  closed (): void {
    this.#cleanup()
  }

  /** From the outbox: the client left more unread than it may. */
  overflowed (): void {
    this.#ctx.log.info({ owner: this.owner }, 'job-progress: closing a client that left too much unread')
    this.close(CloseCodes.slowClient, `client is not reading its messages (over ${this.#ctx.maxBufferedBytes} bytes unread)`)
    // The close frame waits behind what the client has not read; a client that reads again soon
    // gets it, one that does not is cut: what is held meanwhile is at most the high-water mark.
    setTimeout(() => this.transport.terminate(), 3_000).unref()
  }

  #enqueue (step: () => Promise<void> | void): void {
    const tail = this.#chain.then(step).catch((err: Error) => {
      this.#ctx.log.error({ err }, 'job-progress: connection handler failed')
      this.close(CloseCodes.tryAgainLater, 'temporarily unavailable, try again')
    })
    this.#chain = tail
    // Once done, an idle connection does not keep the settled chain.
    void tail.then(() => { if (this.#chain === tail) this.#chain = RESOLVED })
  }

  /**
   * Subscribes run beside each other (a socket that subscribes 100 jobs waits about one open, not
   * 100 in a row, each a few round trips), after the same job's earlier steps. An unsubscribe
   * waits for everything asked before it and holds back everything asked after it, so the room
   * it frees under the subscription limit is there for the next subscribe.
   */
  #enqueueFor (jobId: unknown, step: () => Promise<void>, barrier = false): void {
    const key = typeof jobId === 'string' ? jobId : ''
    const base = this.#barrier ?? this.#chain
    const chains = this.#jobChains ??= new Map()
    const after = barrier
      ? Promise.all([base, ...chains.values()])
      : (chains.get(key) ?? base)
    const tail = after.then(step).catch((err: Error) => {
      this.#ctx.log.error({ err }, 'job-progress: connection handler failed')
      this.close(CloseCodes.tryAgainLater, 'temporarily unavailable, try again')
    })
    if (barrier) {
      this.#barrier = tail
      this.#jobChains = null
      // Once done, an idle connection does not keep the settled unsubscribe.
      void tail.then(() => { if (this.#barrier === tail) this.#barrier = null })
      return
    }
    chains.set(key, tail)
    void tail.then(() => {
      if (chains.get(key) !== tail) return
      chains.delete(key)
      if (chains.size === 0 && this.#jobChains === chains) this.#jobChains = null
    })
  }

  /**
   * Lets the upgrade request go once nothing can ask for it again: only the application's access
   * policy does after authentication, and only for subscribes the client asks for later. Kept,
   * it holds the request, its headers and the raw HTTP message for as long as the socket lives.
   */
  #forgetRequest (): void {
    if (this.#ctx.canAccess === ownerOnly || this.protocol.parse === undefined) this.#request = null
  }

  async #authenticate (jobs: InitialJob[]): Promise<void> {
    try {
      await this.#authenticateRequest(this.#request as FastifyRequest, jobs)
    } finally {
      this.#forgetRequest()
    }
  }

  async #authenticateRequest (request: FastifyRequest, jobs: InitialJob[]): Promise<void> {
    let identity
    try {
      identity = await this.#ctx.owners.fromRequest(request, true, true)
    } catch (err) {
      if (err instanceof UnauthorizedError) return this.#refuse((err as Error).message.replace(/^Authentication required: /, ''))
      throw err
    }
    if (identity === null) return this.#refuse('authentication required: no session or API key')
    if ((identity.via === 'session' || identity.via === 'token') && !this.#ctx.owners.originAllowed(request)) {
      return this.close(CloseCodes.forbidden, 'origin not allowed')
    }
    // A bad watch token on a one-job route: the same close as an unknown job, before anything else.
    if (identity.job === null && this.protocol.perJob === true) return this.close(CloseCodes.forbidden, NOT_FOUND_REASON)
    this.#identity = identity
    await this.#ready(identity.owner)
    if (this.#wantsMine) await this.#subscribeMine()
    for (const job of jobs) await this.#subscribe(job.jobId, job.kind, true, job.logs)
  }

  async #authenticateWith (text: string): Promise<void> {
    let token: unknown
    try {
      token = (JSON.parse(text) as Record<string, unknown>)?.token
    } catch {}
    const owner = typeof token === 'string' ? await this.#ctx.owners.ownerOfKey(token) : null
    if (owner === null) return this.#refuse('Could not validate credentials.')
    await this.#ready(owner)
  }

  #refuse (reason: string): void {
    if (this.#state !== 'auth') return
    const message = serialize(this.protocol.authFailed?.(reason))
    if (message !== undefined && this.transport.open) this.transport.write(message, () => {})
    this.close(CloseCodes.unauthorized, reason)
  }

  async #ready (owner: string): Promise<void> {
    if (this.#state !== 'auth') return
    if (!await this.#ctx.connectionLimit.acquire(owner)) {
      return this.close(CloseCodes.policyViolation, `too many connections (${this.#ctx.maxConnectionsPerOwner} per owner)`)
    }
    // The client left while the slot was being taken.
    if (this.#state !== 'auth') return this.#ctx.connectionLimit.release(owner)
    this.owner = owner
    this.#state = 'ready'
    this.sendControl(this.protocol.connected?.())
    const early = this.#early
    this.#early = null
    if (early !== null) for (const text of early) this.#onText(text)
  }

  #onFrame (data: Buffer | string, isBinary: boolean, size: number): void {
    if (this.#state === 'closed') return
    // ws enforces maxPayload when the plugin made the server; a host-owned server may allow more.
    if (size > this.#ctx.maxPayload) return this.close(CloseCodes.tooBig, `message larger than ${this.#ctx.maxPayload} bytes`)
    if (isBinary) {
      if (this.protocol.error !== undefined) this.sendControl(this.protocol.error('Binary frames are not supported; send JSON text'))
      return
    }
    const text = data.toString()
    if (this.#state === 'auth') {
      if (this.protocol.auth === 'first-message' && this.#authTimer !== null) {
        clearTimeout(this.#authTimer)
        this.#authTimer = null
        this.#enqueue(() => this.#authenticateWith(text))
        return
      }
      const early = this.#early ??= []
      if (early.length >= 16) return this.close(CloseCodes.policyViolation, 'too many messages before authentication')
      early.push(text)
      return
    }
    this.#onText(text)
  }

  #onText (text: string): void {
    const action: ClientAction = this.protocol.parse?.(text) ?? { type: 'ignore' }
    switch (action.type) {
      case 'subscribe':
        this.#pending++
        this.#enqueueFor(action.jobId, () => this.#subscribe(action.jobId, undefined, true, action.logs))
        break
      case 'subscribe_mine':
        this.#enqueue(() => this.#subscribeMine())
        break
      case 'unsubscribe_mine':
        // Behind a subscribe_mine still in progress, so it cannot be undone by it.
        this.#enqueue(() => {
          this.#mine?.()
          this.#mine = null
        })
        break
      case 'unsubscribe':
        this.#enqueueFor(action.jobId, () => this.#unsubscribe(action.jobId), true)
        break
      case 'ping':
        this.sendControl(this.protocol.pong?.())
        break
      case 'invalid':
        this.#error(action.message)
        break
    }
  }

  #error (message: string, jobId?: string): void {
    // A protocol that cannot render errors closes instead, so no client waits on a silent failure.
    if (this.protocol.error === undefined) return this.close(CloseCodes.policyViolation, message)
    this.sendControl(this.protocol.error(message, jobId))
  }

  #notFound (jobId: unknown): void {
    if (this.protocol.perJob === true) return this.close(CloseCodes.forbidden, NOT_FOUND_REASON)
    const id = String(jobId).slice(0, 64)
    this.#error(`Job not found or access denied: ${id}`, id)
  }

  async #subscribe (jobId: unknown, kind: string | undefined, counted: boolean, logs?: LogsRequest): Promise<void> {
    try {
      await this.#open(jobId, kind, logs)
    } finally {
      if (counted) this.#pending--
      this.#closeIfDone()
    }
  }

  async #open (jobId: unknown, kind?: string, logs?: LogsRequest): Promise<void> {
    if (this.#state !== 'ready') return
    if (!isJobId(jobId)) return this.#notFound(jobId)
    const existing = this.#subs.get(jobId)
    if (existing !== undefined) {
      this.sendControl(this.protocol.subscribed?.(jobId))
      const data = existing.last === null ? undefined : serialize(this.protocol.render(existing.last))
      if (data !== undefined && existing.last !== null) this.outbox.send(data, jobId, isFinal(existing.last.state))
      // Asked again with logs: they start over from the offset now asked for.
      if (logs !== undefined) await this.#restartLogs(existing, existing.target, logs)
      return
    }
    if (this.#subs.size + this.#opening >= this.#ctx.maxSubscriptionsPerConnection) {
      return this.#error(`Subscription limit reached: at most ${this.#ctx.maxSubscriptionsPerConnection} jobs per connection`, jobId)
    }
    this.#opening++
    try {
      await this.#openNew(jobId, kind, logs)
    } finally {
      this.#opening--
    }
  }

  async #openNew (jobId: string, kind?: string, logs?: LogsRequest): Promise<void> {
    const found = kind ?? await this.#ctx.findKind(jobId)
    const queue = found === null ? undefined : this.#ctx.queueOf(found)
    if (found === null || queue === undefined) return this.#notFound(jobId)
    const target: SnapshotTarget = { kind: found, queue, jobId }
    if (this.owner === null) return this.#notFound(jobId)
    // A watch token grants its one job and nothing else; the hub checks the owner it names.
    const identity = this.#identity
    if (identity?.via === 'token' && (identity.job === null || identity.job === undefined || identity.job.kind !== found || identity.job.jobId !== jobId)) return this.#notFound(jobId)
    // The owner is read alone first, so a job the requester may not watch costs no subscription.
    // With the default policy the hub checks it; a policy of the application's is asked here.
    let expected: string | undefined = this.owner
    if (identity?.via !== 'token' && this.#ctx.canAccess !== ownerOnly) {
      const owner = await this.#ctx.ownerOf(target)
      if (owner === null || !await allowed(this.#ctx.canAccess, this.#request as FastifyRequest, { kind: found, jobId, owner, data: null }, 'watch', this.owner)) return this.#notFound(jobId)
      expected = owner
    }
    const opened = await this.#ctx.hub.open(target, expected)
    if (opened === null) return this.#notFound(jobId)
    if (this.#state !== 'ready') {
      opened.detach({ deliver () {} })
      return
    }
    const withLogs = logs !== undefined && await this.#logsAllowed(target)
    if (this.#state !== 'ready') {
      opened.detach({ deliver () {} })
      return
    }
    this.sendControl(this.protocol.subscribed?.(jobId))
    const sub = new Subscription(opened, target, this)
    this.#subs.add(sub)
    // The feed is in place before the current state is delivered: a job that has ended sends
    // its lines first, then its final state.
    if (withLogs) this.#feed(sub, target, logs)
    opened.attach(sub.sink)
    if (!sub.final && sub.logs !== undefined) {
      sub.logs.feed.start()
      // The job's next action waits for the catch-up: a client that subscribes and unsubscribes
      // in a loop gets one log read at a time, not one per message.
      await sub.logs.feed.idle()
    }
  }

  /** Whether this connection may have a job's lines; says why not when it may not. */
  async #logsAllowed (target: SnapshotTarget): Promise<boolean> {
    if (this.#ctx.logs === undefined || this.protocol.logs === undefined) {
      this.#error('This connection serves no logs', target.jobId)
      return false
    }
    if (this.#identity?.via !== 'token' && this.#ctx.canAccess !== ownerOnly && this.owner !== null) {
      const owner = await this.#ctx.ownerOf(target)
      if (owner === null || !await allowed(this.#ctx.canAccess, this.#request as FastifyRequest, { kind: target.kind, jobId: target.jobId, owner, data: null }, 'logs', this.owner)) {
        this.#error(`Logs not available: ${target.jobId}`, target.jobId)
        return false
      }
    }
    return true
  }

  /**
   * Starts a subscription's log lines: registered for live lines first, then caught up from the
   * job's log list, so no line falls between. A policy of the application's is asked for `logs`.
   */
  /** A subscription asked for lines again: they start over from the offset now asked for. */
  async #restartLogs (sub: Subscription, target: SnapshotTarget, request: LogsRequest): Promise<void> {
    if (!await this.#logsAllowed(target) || this.#subs.get(target.jobId) !== sub) return
    // The replaced feed's read in flight ends first: asking again and again costs one read at a time.
    await sub.logs?.feed.idle()
    if (this.#subs.get(target.jobId) !== sub) return
    const feed = this.#feed(sub, target, request)
    if (!sub.final) {
      feed.start()
      return await feed.idle()
    }
    // Its final state was sent already; what is left of its log follows it.
    this.#pending++
    feed.finish().finally(() => {
      this.#pending--
      this.#closeIfDone()
    })
  }

  /** Registers a subscription's log feed for live lines; the caller starts it. */
  #feed (sub: Subscription, target: SnapshotTarget, request: LogsRequest): LogFeed {
    const logs = this.#ctx.logs as LogsContext
    const render = this.protocol.logs as NonNullable<ProtocolDefinition['logs']>
    sub.logs?.stop()
    const feed = new LogFeed({
      jobId: target.jobId,
      request,
      read: async (from, limit) => await logs.read(target, from, limit),
      send: (message) => {
        const bytes = logBytes(this.protocol, render, message)
        if (bytes !== undefined) this.outbox.send(bytes)
      },
      backlog: () => this.outbox.queuedBytes + this.transport.bufferedAmount,
      maxBacklogBytes: Math.min(logs.maxBacklogBytes, this.#ctx.maxBufferedBytes / 2),
      maxCatchUpLines: logs.maxCatchUpLines,
      onError: (err) => this.#ctx.log.warn({ err, jobId: target.jobId }, 'job-progress: cannot read a job\'s log for a watcher')
    })
    sub.logs = { feed, stop: logs.feeds.add(logs.channel(target), feed) }
    return feed
  }

  async #subscribeMine (): Promise<void> {
    if (this.#state !== 'ready' || this.owner === null || this.#mine !== null) return
    const mine = this.#ctx.mine
    const render = this.protocol.mine
    // A watch token grants its one job, not the owner's list.
    if (mine === undefined || render === undefined || this.#identity?.via === 'token') return this.#error('This connection serves no jobs feed')
    const stop = await mine.watch(this.owner, (message) => {
      const data = serialize(render(message))
      if (data === undefined) return
      // Keyed per job: a slow client gets each job's latest state; finals and resyncs are never replaced.
      if (message.type === 'my_jobs_resync') this.outbox.send(data, '\u0001', true)
      // A creation is never replaced either: its `created` flag would be lost.
      else this.outbox.send(data, `\u0001${message.job_id}`, message.created === true || (message.status !== 'queued' && message.status !== 'running'))
    })
    if (this.#state !== 'ready' || this.#mine !== null) return stop()
    this.#mine = stop
    this.sendControl(this.protocol.subscribed?.('mine'))
  }

  static {
    deliverTo = (session, sub, event) => session.#deliver(sub, event)
  }

  #deliver (sub: Subscription, event: JobEvent): void {
    if (sub.final) return
    sub.last = event
    const final = isFinal(event.state)
    if (final && sub.logs !== undefined) {
      // A job's last lines can be relayed after its final state: what is left of its log is
      // read and sent first, so a watcher that has the final state has every line.
      sub.final = true
      this.#pending++
      sub.logs.feed.finish().finally(() => {
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
    const { text, bytes } = renderOnce(this.protocol, event)
    // Two events can render alike (queued and active are both `processing 0/0` in seed 000's
    // format): the client learns nothing from the second.
    if (text !== undefined && bytes !== undefined && (final || text !== sub.sent)) {
      sub.sent = text
      this.outbox.send(bytes, event.jobId, final)
    }
  }

  /**
   * A close-on-final connection ends once every job it watches has ended and no subscribe is
   * still to be answered: a finished job and a running one subscribed in one write must not
   * close it after the first.
   */
  #closeIfDone (): void {
    if (this.protocol.closeOnFinal !== true || this.#state !== 'ready' || this.#pending > 0 || this.#subs.size === 0) return
    for (const sub of this.#subs.values()) if (!sub.final) return
    this.outbox.closeWhenFlushed(CloseCodes.normal, 'job finished')
  }

  async #unsubscribe (jobId: unknown): Promise<void> {
    if (typeof jobId !== 'string') return
    const sub = this.#subs.get(jobId)
    if (sub !== undefined) {
      this.#subs.delete(jobId)
      sub.logs?.stop()
      sub.opened.detach(sub.sink)
    }
    this.sendControl(this.protocol.unsubscribed?.(jobId))
    this.#closeIfDone()
  }

  #cleanup (): void {
    if (this.#state === 'closed') return
    const wasReady = this.#state === 'ready'
    this.#state = 'closed'
    if (this.#authTimer !== null) clearTimeout(this.#authTimer)
    for (const sub of this.#subs.values()) {
      sub.logs?.stop()
      sub.opened.detach(sub.sink)
    }
    this.#subs.clear()
    this.#mine?.()
    this.#mine = null
    this.#ctx.sessions.delete(this)
    if (wasReady && this.owner !== null) this.#ctx.connectionLimit.release(this.owner)
  }
}
