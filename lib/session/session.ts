import type { FastifyRequest } from 'fastify'
import { ownerOnly, type Identity } from '../core/access'
import { UnauthorizedError } from '../errors'
import { Outbox } from './outbox'
import type { ClientAction, ProtocolDefinition, ServerMessage } from '../protocols/types'
import { CloseCodes, closeReason, NOT_FOUND_REASON } from '../wire/close-codes'
import type { Transport, TransportEvents } from './transport'
import { serialize } from './render'
import { SessionJobs, type JobsConnection } from './session-jobs'
import { InboundLimit } from './inbound'
import { mineReceiver } from './mine-feed'
import type { InitialJob, SessionContext } from './session-context'
import { StepOrder, type StepOwner } from './step-order'

export type { InitialJob, SessionContext }

/**
 * One client connection under one protocol, over any transport: authenticates it, checks
 * ownership before any job data leaves, subscribes its jobs through the hub, and applies the
 * limits. The protocol only renders; the transport only carries.
 *
 * Most connections sit idle for most of their life, and a server holds thousands: what a session
 * keeps is made when it is first needed (a map of waiting steps, a list of early messages), and
 * what only its start needs (the upgrade request) is let go once it cannot be asked for again.
 *
 * The session owns the connection: authentication, the order of a client's steps, the jobs feed
 * and the close. What it does for each job it watches is in {@link SessionJobs}.
 */
export class Session implements TransportEvents, JobsConnection, StepOwner {
  readonly transport: Transport
  readonly outbox: Outbox
  readonly protocol: ProtocolDefinition
  owner: string | null = null
  #identity: Identity | null = null
  readonly #ctx: SessionContext
  /** Kept while an access policy of the application's may still be asked about it (see {@link #forgetRequest}). */
  #request: FastifyRequest | null
  /** The jobs it watches. */
  readonly #jobs: SessionJobs
  #state: 'auth' | 'ready' | 'closed' = 'auth'
  /** The order its steps run in. */
  readonly #steps: StepOrder
  /** Messages that arrived before authentication ended. */
  #early: string[] | null = null
  #authTimer: NodeJS.Timeout | null = null
  /** The connection-limit slot it holds while ready. */
  #slot: string | null = null
  /** Stops the caller's jobs feed, while subscribed. */
  #mine: (() => void) | null = null
  #wantsMine: boolean
  /** Its message rate and its actions in flight. */
  readonly #inbound: InboundLimit

  /** Call synchronously from the route handler: messages that arrive before auth ends are kept. */
  constructor (ctx: SessionContext, protocol: ProtocolDefinition, transport: Transport, request: FastifyRequest, jobs: InitialJob[] = [], mine = false) {
    this.#ctx = ctx
    this.#wantsMine = mine
    this.protocol = protocol
    this.transport = transport
    this.#request = request
    this.outbox = new Outbox(transport, { maxBytes: ctx.maxBufferedBytes, owner: this })
    this.#jobs = new SessionJobs(ctx, this)
    this.#inbound = new InboundLimit(ctx.inbound)
    this.#steps = new StepOrder(this)
    ctx.sessions.add(this)
    transport.bind(this)
    if (protocol.auth === 'first-message') {
      this.#forgetRequest()
      this.#authTimer = setTimeout(() => this.#refuse('authentication timeout: send {"token": "..."} first'), ctx.firstMessageTimeoutMs).unref()
    } else {
      this.#jobs.expect(jobs.length)
      this.#steps.enqueue(async () => await this.#authenticate(jobs))
    }
  }

  get subscriptions (): number {
    return this.#jobs.size
  }

  /** Whether it follows the owner's jobs feed. */
  get followsMine (): boolean {
    return this.#mine !== null
  }

  /** Authenticated and not closed: jobs may be opened and their states sent. */
  get serving (): boolean {
    return this.#state === 'ready'
  }

  /** Who the connection authenticated as; null until it did. */
  get identity (): Identity | null {
    return this.#identity
  }

  /** The upgrade request, while an access policy of the application's may still ask about it. */
  get request (): FastifyRequest | null {
    return this.#request
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

  /** From the outbox: a send is in flight (the instance checks it for a stall until it flushes). */
  sending (): void {
    this.#ctx.sessions.sending(this)
  }

  /** From the outbox: the client left more unread than it may. */
  overflowed (): void {
    this.#ctx.log.info({ owner: this.owner }, 'job-progress: closing a client that left too much unread')
    this.close(CloseCodes.slowClient, `client is not reading its messages (over ${this.#ctx.maxBufferedBytes} bytes unread)`)
    // The close frame waits behind what the client has not read; a client that reads again soon
    // gets it, one that does not is cut: what is held meanwhile is at most the high-water mark.
    setTimeout(() => this.transport.terminate(), 3_000).unref()
  }

  /** From its steps: one failed, and the client is told to come back later. */
  stepFailed (err: Error): void {
    this.#ctx.log.error({ err }, 'job-progress: connection handler failed')
    this.close(CloseCodes.tryAgainLater, 'temporarily unavailable, try again')
  }

  /** From its steps: an action counted in flight was answered (or failed). */
  stepAnswered (): void {
    this.#inbound.end()
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
    this.#ready(identity.owner)
    if (identity.expiresAt !== undefined) this.#ctx.sessions.expires(this)
    if (this.#wantsMine) await this.#subscribeMine()
    for (const job of jobs) await this.#jobs.subscribe(job.jobId, job.kind, true, job.logs, job.streams)
  }

  async #authenticateWith (text: string): Promise<void> {
    let token: unknown
    try {
      token = (JSON.parse(text) as Record<string, unknown>)?.token
    } catch {}
    const owner = typeof token === 'string' ? await this.#ctx.owners.ownerOfKey(token) : null
    if (owner === null) return this.#refuse('Could not validate credentials.')
    this.#ready(owner)
  }

  #refuse (reason: string): void {
    if (this.#state !== 'auth') return
    const message = serialize(this.protocol.authFailed?.(reason))
    if (message !== undefined && this.transport.open) this.transport.write(message, () => {})
    this.close(CloseCodes.unauthorized, reason)
  }

  #ready (owner: string): void {
    if (this.#state !== 'auth') return
    // Counted on this instance at once; confirmed across instances in the background (one call
    // per owner and turn, answered before any job read sent after it), so a storm of sockets does
    // not wait a round trip each before its first subscription.
    const slot = this.#ctx.connectionLimit.take(owner, () => {
      if (this.#slot !== slot) return
      this.#slot = null
      this.#tooMany()
    })
    if (slot === null) return this.#tooMany()
    this.#slot = slot
    this.owner = owner
    this.#state = 'ready'
    this.sendControl(this.protocol.connected?.())
    const early = this.#early
    this.#early = null
    if (early !== null) for (const text of early) this.#onText(text)
  }

  #tooMany (): void {
    this.close(CloseCodes.policyViolation, `too many connections (${this.#ctx.maxConnectionsPerOwner} per owner)`)
  }

  #onFrame (data: Buffer | string, isBinary: boolean, size: number): void {
    if (this.#state === 'closed') return
    // Every frame counts, read or ignored, before authentication too: parsing is work as well.
    const tooFast = this.#inbound.message()
    if (tooFast !== null) return this.#abuse(tooFast)
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
        this.#steps.enqueue(async () => await this.#authenticateWith(text))
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
      case 'subscribe': {
        const over = this.#inbound.begin()
        if (over !== null) return this.#abuse(over)
        // Nothing to wait for (the common case: a job new to the connection): it starts now.
        if (action.logs === undefined && action.streams === undefined && this.#jobs.subscribeNow(action.jobId, this.#steps)) break
        this.#jobs.expect(1)
        this.#steps.enqueueFor(action.jobId, this.#begun(async () => await this.#jobs.subscribe(action.jobId, undefined, true, action.logs, action.streams)))
        break
      }
      case 'subscribe_mine': {
        const step = this.#counted(() => this.#subscribeMine())
        if (step !== null) this.#steps.enqueue(step)
        break
      }
      case 'unsubscribe_mine': {
        // Behind a subscribe_mine still in progress, so it cannot be undone by it.
        const step = this.#counted(() => {
          this.#mine?.()
          this.#mine = null
        })
        if (step !== null) this.#steps.enqueue(step)
        break
      }
      case 'unsubscribe': {
        const step = this.#counted(() => this.#jobs.unsubscribe(action.jobId))
        if (step !== null) this.#steps.enqueueFor(action.jobId, step, true)
        break
      }
      case 'ping':
        this.sendControl(this.protocol.pong?.())
        break
      case 'invalid':
        this.error(action.message)
        break
    }
  }

  /**
   * A client action counted in flight until it is answered, or null (and the connection closed)
   * when the client already waits for as many answers as it may.
   */
  #counted (step: () => Promise<void> | void): (() => Promise<void>) | null {
    const over = this.#inbound.begin()
    if (over !== null) {
      this.#abuse(over)
      return null
    }
    return this.#begun(step)
  }

  /** A step of an action counted in flight ({@link InboundLimit.begin}): answered when it ends. */
  #begun (step: () => Promise<void> | void): () => Promise<void> {
    return async () => {
      try {
        await step()
      } finally {
        this.#inbound.end()
      }
    }
  }

  /**
   * Closes a client that asks for more than it may: 1008, which tells clients not to reconnect
   * (a client that retried would do it again). What it still sends is not read: ws ends the
   * connection when the client does not answer the close.
   */
  #abuse (reason: string): void {
    this.#ctx.log.info({ owner: this.owner, reason }, 'job-progress: closing a client that sends more than it may')
    this.close(CloseCodes.policyViolation, reason)
  }

  /** Sends an error the protocol renders, for a job or the connection. */
  error (message: string, jobId?: string): void {
    // A protocol that cannot render errors closes instead, so no client waits on a silent failure.
    if (this.protocol.error === undefined) return this.close(CloseCodes.policyViolation, message)
    this.sendControl(this.protocol.error(message, jobId))
  }

  async #subscribeMine (): Promise<void> {
    if (this.#state !== 'ready' || this.owner === null || this.#mine !== null) return
    const mine = this.#ctx.mine
    const render = this.protocol.mine
    // A watch token grants its one job, not the owner's list.
    if (mine === undefined || render === undefined || this.#identity?.via === 'token') return this.error('This connection serves no jobs feed')
    const stop = await mine.watch(this.owner, mineReceiver(this.outbox, render))
    if (this.#state !== 'ready' || this.#mine !== null) return stop()
    this.#mine = stop
    this.sendControl(this.protocol.subscribed?.('mine'))
  }

  #cleanup (): void {
    if (this.#state === 'closed') return
    const wasReady = this.#state === 'ready'
    this.#state = 'closed'
    if (this.#authTimer !== null) clearTimeout(this.#authTimer)
    this.#jobs.close()
    this.#mine?.()
    this.#mine = null
    this.#ctx.sessions.delete(this)
    if (wasReady && this.owner !== null && this.#slot !== null) this.#ctx.connectionLimit.release(this.owner, this.#slot)
  }
}
