import type { FastifyBaseLogger, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { createHash } from 'node:crypto'
import type { Broker } from '../../broker/broker'
import type { BridgeEvent } from '../../bridge/bridge'
import { InvalidListQueryError, QueueUnavailableError, UnauthorizedError } from '../../errors'
import { errors } from '../../http/schemas'
import type { Keys } from '../../core/keys'
import { decodeCursor, encodeCursor, type OwnerIndex } from './owner-index'
import { EXPIRED, type Owners } from '../../http/auth/identity'
import { sseProtocol } from '../../protocols/sse-protocol'
import type { ProtocolDefinition } from '../../protocols/types'
import { sseFrame } from '../../wire/sse-frame'
import { readOwner, type Commands } from '../../core/snapshot'
import { Session, type SessionContext } from '../../session/session'
import { lastEventId, SseTransport } from '../../transports/sse'
import type { MyJobMessage, MyJobsResyncMessage } from '../../wire/messages'
import { compareEntryIds } from '../../wire/version'
import { FeedHistory, type FeedMessage } from './feed-history'

/** What each relayed BullMQ event means for the owner's list; progress reports are not state changes. */
const STATUS: Record<string, MyJobMessage['status']> = {
  waiting: 'queued',
  delayed: 'queued',
  stalled: 'queued',
  active: 'running',
  completed: 'succeeded',
  failed: 'failed',
  cancelled: 'cancelled',
  removed: 'removed'
}

/** Owners of jobs seen lately, so an event costs no read while its job runs. */
const OWNER_CACHE = 10_000

/**
 * How long an instance stays subscribed to an owner's channel after its last follower left: a
 * stream that comes back meanwhile (a reload, a dropped connection, an EventSource's retry)
 * resumes from what was kept instead of re-reading its list.
 */
const LINGER_MS = 60_000

export interface MyJobsOptions {
  redis: Commands
  broker: Broker
  keys: Keys
  index: OwnerIndex
  /** The kind of a queue's jobs. */
  kindOf: (queue: string) => string | undefined
  /** Publish state changes from the bridge (`myJobs.feed`). */
  feed: boolean
  log: FastifyBaseLogger
}

type Receive = (message: MyJobMessage | MyJobsResyncMessage, raw: string) => void

/**
 * The caller's jobs across the cluster. Writing: a job's creation adds it to its owner's index and
 * publishes `created` on the owner's channel; each lifecycle event, read ONCE per cluster by the
 * bridge, is published there too (its owner read once per job, then cached while it runs): one
 * PUBLISH per lifecycle event whatever the number of instances, nothing per progress report.
 * Reading: an instance subscribes an owner's channel while one of its connections follows that
 * owner's jobs.
 */
export class MyJobs {
  readonly #o: MyJobsOptions
  readonly #owners = new Map<string, string>()
  /** Per owner's channel and job, the newest change passed on (bounded like the owner cache). */
  readonly #latest = new Map<string, string>()
  readonly #listeners = new Map<string, Set<Receive>>()
  /** Per channel, its SUBSCRIBE: every follower waits for it, not only the first. */
  readonly #subscribed = new Map<string, Promise<void>>()
  /** Channels no one follows any more, still subscribed for a stream that comes back. */
  readonly #lingering = new Map<string, NodeJS.Timeout>()
  /** What was passed on lately, numbered for the SSE feed's event ids. */
  readonly history = new FeedHistory()
  /** Messages published (for tests and the bench). */
  published = 0

  constructor (opts: MyJobsOptions) {
    this.#o = opts
    opts.broker.onMessage((channel, raw) => this.#onMessage(channel, raw))
    opts.broker.onRecover(() => this.#resync())
  }

  /** Subscriptions lost and made again: what was published meanwhile is gone, so every follower re-reads its list. */
  #resync (): void {
    for (const [channel, set] of this.#listeners) {
      // One message per channel: each is numbered and kept in its channel's history, so a
      // stream that comes back after missing it is told too.
      const message: MyJobsResyncMessage = { type: 'my_jobs_resync', ts: Math.floor(Date.now() / 1000) }
      this.#pass(channel, set, message, JSON.stringify(message))
    }
  }

  #pass (channel: string, set: Set<Receive>, message: FeedMessage, raw: string): void {
    this.history.record(channel, message)
    for (const receive of set) receive(message, raw)
  }

  /** The owner's channel: hashed, so any owner string makes a short name, spread over shards. */
  channel (owner: string): string {
    const tag = createHash('sha256').update(owner).digest('base64url').slice(0, 22)
    return this.#o.keys.ownerChannel(tag)
  }

  /** After a job was added: the index, and the owner's live lists hear of it. */
  async created (queue: string, kind: string, jobId: string, owner: string): Promise<void> {
    const now = Date.now()
    this.#remember(`${queue}\0${jobId}`, owner)
    await this.#o.index.add(queue, jobId, owner, now)
    await this.#publish(owner, { type: 'my_job', job_id: jobId, kind, status: 'queued', created: true, ts: Math.floor(now / 1000) })
  }

  /** A bridge listener: once per relayed stream entry across the cluster. */
  async onEvent (event: BridgeEvent): Promise<void> {
    if (!this.#o.feed) return
    const status = STATUS[event.event]
    const kind = this.#o.kindOf(event.queue)
    if (status === undefined || kind === undefined) return
    // BullMQ's `waiting` without `prev` is the job being added: the creation path announced it.
    if (event.event === 'waiting' && event.fields.prev === undefined) return
    const id = `${event.queue}\0${event.jobId}`
    let owner = this.#owners.get(id) ?? null
    if (owner === null) {
      owner = await readOwner(this.#o.redis, this.#o.keys, { kind, queue: event.queue, jobId: event.jobId })
      if (owner === null) return
      this.#remember(id, owner)
    }
    if (event.final || status === 'removed') this.#owners.delete(id)
    await this.#publish(owner, { type: 'my_job', job_id: event.jobId, kind, status, version: event.id, ts: Math.floor(event.t / 1000) })
  }

  /** Follows an owner's jobs; resolves once subscribed, with the function that stops. */
  async watch (owner: string, receive: Receive): Promise<() => void> {
    const channel = this.channel(owner)
    let set = this.#listeners.get(channel)
    const first = set === undefined
    if (set === undefined) {
      set = new Set()
      this.#listeners.set(channel, set)
    }
    set.add(receive)
    clearTimeout(this.#lingering.get(channel))
    this.#lingering.delete(channel)
    if (first) {
      this.history.open(channel)
      this.#subscribed.set(channel, this.#o.broker.subscribe([channel]))
    }
    const subscribed = this.#subscribed.get(channel) as Promise<void>
    try {
      await subscribed
    } catch (err) {
      // Every follower waiting on it is refused, and the next one subscribes again.
      if (this.#subscribed.get(channel) === subscribed) {
        this.#subscribed.delete(channel)
        this.#listeners.delete(channel)
        this.history.close(channel)
      }
      throw err
    }
    return () => this.#leave(channel, receive)
  }

  #leave (channel: string, receive: Receive): void {
    const set = this.#listeners.get(channel)
    if (set === undefined || !set.delete(receive) || set.size > 0) return
    this.#lingering.set(channel, setTimeout(() => this.#drop(channel), LINGER_MS).unref())
  }

  #drop (channel: string): void {
    this.#lingering.delete(channel)
    if ((this.#listeners.get(channel)?.size ?? 0) > 0) return
    this.#listeners.delete(channel)
    this.#subscribed.delete(channel)
    this.history.close(channel)
    this.#o.broker.unsubscribe([channel]).catch((err: Error) => this.#o.log.debug({ err }, 'job-progress: unsubscribe failed'))
  }

  /** Stops the lingering: the broker's subscriptions end with it. */
  close (): void {
    for (const timer of this.#lingering.values()) clearTimeout(timer)
    this.#lingering.clear()
  }

  #remember (id: string, owner: string): void {
    this.#owners.set(id, owner)
    if (this.#owners.size > OWNER_CACHE) this.#owners.delete(this.#owners.keys().next().value as string)
  }

  async #publish (owner: string, message: MyJobMessage): Promise<void> {
    this.published++
    await this.#o.broker.publish([[this.channel(owner), JSON.stringify(message)]])
  }

  #onMessage (channel: string, raw: string): void {
    const set = this.#listeners.get(channel)
    if (set === undefined) return
    let message: MyJobMessage
    try {
      message = JSON.parse(raw)
    } catch {
      return
    }
    if (message?.type !== 'my_job' || typeof message.job_id !== 'string') return
    if (typeof message.version === 'string') {
      // An older change published after a newer one (another instance's bridge was slower): dropped.
      const key = `${channel}\0${message.job_id}`
      const latest = this.#latest.get(key)
      if (latest !== undefined && compareEntryIds(message.version, latest) <= 0) return
      this.#latest.delete(key)
      this.#latest.set(key, message.version)
      if (this.#latest.size > OWNER_CACHE) this.#latest.delete(this.#latest.keys().next().value as string)
    }
    this.#pass(channel, set, message, raw)
  }
}

const STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled']

const ListSchema = {
  type: 'object',
  properties: {
    jobs: {
      type: 'array',
      items: {
        type: 'object',
        properties: {
          job_id: { type: 'string' },
          kind: { type: 'string' },
          status: { type: 'string', enum: STATES },
          progress: { type: 'number' },
          processed: { type: 'integer' },
          total: { type: 'integer' },
          eta_seconds: { type: ['number', 'null'] },
          error: { type: ['string', 'null'] },
          created_at: { type: 'integer', description: 'milliseconds since the epoch' },
          stage: { type: 'string' },
          message: { type: 'string' }
        },
        required: ['job_id', 'kind', 'status', 'progress', 'processed', 'total', 'eta_seconds', 'error', 'created_at']
      }
    },
    next: { type: ['string', 'null'], description: 'the cursor of the next page; null on the last' }
  },
  required: ['jobs', 'next']
} as const
const MAX_LIMIT = 100

export interface MyJobsRoutes {
  path: string
  owners: Owners
  index: OwnerIndex
  kinds: Array<{ kind: string, queue: string }>
  /** For the SSE feed: sessions as every stream has them, and the feed's history to resume from. */
  session: SessionContext
  feed: MyJobs
  retryMs: number
}

/** `GET <path>` (the caller's jobs) and `GET <path>/events` (their changes, as SSE). */
export function registerMyJobsRoutes (fastify: FastifyInstance, r: MyJobsRoutes): void {
  const kindNames = r.kinds.map(k => k.kind)
  fastify.get(r.path, {
    schema: {
      summary: 'The caller\'s jobs, newest first',
      querystring: {
        type: 'object',
        properties: {
          kind: { type: 'string', description: 'only jobs of these kinds (comma-separated)' },
          state: { type: 'string', description: `only jobs in these states (comma-separated: ${STATES.join(', ')})` },
          limit: { type: 'integer', minimum: 1, maximum: MAX_LIMIT, default: 20 },
          cursor: { type: 'string', maxLength: 200, description: 'the `next` of the previous page' }
        }
      },
      response: { 200: ListSchema, ...errors(400, 401, 503) }
    }
  }, async (request: FastifyRequest<{ Querystring: { kind?: string, state?: string, limit: number, cursor?: string } }>) => {
    const identity = await r.owners.fromRequest(request)
    if (identity === null) throw new UnauthorizedError(r.owners.expiredSession(request) ? EXPIRED : 'no session or API key')
    const q = request.query
    const kinds = q.kind === undefined ? kindNames : q.kind.split(',').map(s => s.trim()).filter(s => s !== '')
    const unknownKind = kinds.find(k => !kindNames.includes(k))
    if (unknownKind !== undefined) throw new InvalidListQueryError(`unknown kind: ${unknownKind.slice(0, 64)}`)
    const states = new Set(q.state === undefined ? [] : q.state.split(',').map(s => s.trim()).filter(s => s !== ''))
    const unknownState = [...states].find(s => !STATES.includes(s))
    if (unknownState !== undefined) throw new InvalidListQueryError(`unknown state: ${unknownState.slice(0, 64)} (one of ${STATES.join(', ')})`)
    const cursor = q.cursor === undefined ? null : decodeCursor(q.cursor)
    if (q.cursor !== undefined && cursor === null) throw new InvalidListQueryError('invalid cursor')
    const page = await r.index.list(identity.owner, r.kinds.filter(k => kinds.includes(k.kind)), states, q.limit, cursor).catch((err: unknown) => {
      request.log.warn({ err }, 'job-progress: cannot list jobs')
      throw new QueueUnavailableError()
    })
    return { jobs: page.jobs, next: page.next === null ? null : encodeCursor(page.next) }
  })

  // Every event has an id (`<instance>.<n>`, `subscribed` included), so an EventSource that
  // reconnects sends the last one it saw as Last-Event-ID.
  const history = r.feed.history
  const feedProtocol: ProtocolDefinition = {
    ...sseProtocol(false),
    name: 'sse-mine',
    mine: (message) => sseFrame(message.type, message, history.idOf(message))
  }
  const eventsSchema: Record<string, unknown> = {
    summary: 'The caller\'s jobs as they are created and change state (Server-Sent Events `my_job`)',
    produces: ['text/event-stream'],
    response: { 200: { description: 'a text/event-stream: `subscribed` once, then `my_job` events (see the README)', type: 'string' }, ...errors(401, 429) }
  }
  fastify.get(`${r.path}/events`, { schema: eventsSchema }, (request: FastifyRequest, reply: FastifyReply) => {
    const last = lastEventId(request)
    let session: Session | null = null
    reply.hijack()
    // The stream starts with `event: subscribed` once the feed is in effect: from then on no
    // change is missed (and the response's headers go out only with a first event). A stream
    // that comes back gets, right behind it, what it missed, when this instance kept all of it
    // (it numbered the id, still follows the channel, and kept everything since); otherwise a
    // `my_jobs_resync`: read the list again. Rendered in one piece, nothing can come between.
    const protocol: ProtocolDefinition = {
      ...feedProtocol,
      subscribed: (id) => {
        if (id !== 'mine') return undefined
        const frames = [sseFrame('subscribed', { feed: 'mine' }, history.now())]
        if (last !== undefined && session?.owner != null) {
          const missed = history.since(r.feed.channel(session.owner), last)
          if (missed === null) frames.push(sseFrame('my_jobs_resync', { type: 'my_jobs_resync', ts: Math.floor(Date.now() / 1000) }))
          else for (const message of missed) frames.push(feedProtocol.mine?.(message) as string)
        }
        return frames.join('')
      }
    }
    session = new Session(r.session, protocol, new SseTransport(reply, r.retryMs), request, [], true)
  })
}
