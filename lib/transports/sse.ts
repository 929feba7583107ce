import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { ServerResponse } from 'node:http'
import { logResume, sseProtocol } from '../protocols/sse-protocol'
import type { LogsRequest } from '../channels/logs/live-logs'
import { MAX_STREAMS_PER_JOB, type StreamsRequest } from '../channels/streams/live-streams'
import { isStreamName, streamResume } from '../wire/streams'
import { Session, type InitialJob, type SessionContext } from '../session/session'
import type { OutboxData, Transport, TransportEvents } from '../session/transport'
import { CloseCodes, httpStatus } from '../wire/close-codes'
import { sseSchema } from '../http/schemas'
import { SSE_DONE_ID, sseFrame } from '../wire/sse-frame'

/**
 * An HTTP response as a session transport (text/event-stream). Nothing is written before the
 * session's first message, so a refusal (credentials, a job that is not found, too many
 * connections) is still a plain HTTP status, which an EventSource does not retry.
 */
export class SseTransport implements Transport {
  readonly kind = 'sse'
  readonly #res: ServerResponse
  readonly #retryMs: number
  #started = false

  constructor (reply: FastifyReply, retryMs: number) {
    this.#res = reply.raw
    this.#retryMs = retryMs
  }

  get open (): boolean {
    return !this.#res.destroyed && !this.#res.writableEnded
  }

  get bufferedAmount (): number {
    return this.#res.writableLength
  }

  bind (events: TransportEvents): void {
    this.#res.on('close', () => events.closed())
    this.#res.on('error', () => {})
    // Reset before the route ran: its `close` has been and gone, and the slot taken for it must go too.
    if (this.#res.closed || this.#res.socket?.destroyed === true) queueMicrotask(() => events.closed())
  }

  #start (): void {
    if (this.#started) return
    this.#started = true
    this.#res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache, no-transform',
      // A stream's connection is not reused after it ends: kept alive, an ended stream's socket
      // is not counted as idle and would hold up the server's close.
      connection: 'close',
      // nginx would otherwise buffer the stream and deliver it in lumps, or at the end.
      'x-accel-buffering': 'no'
    })
    this.#res.write(`retry: ${this.#retryMs}\n\n`)
  }

  write (data: OutboxData, done: (err?: Error | null) => void): void {
    this.#start()
    this.#res.write(data, done)
  }

  close (code: number, reason: string): void {
    if (!this.open) return
    if (!this.#started) {
      const status = httpStatus(code)
      const body = JSON.stringify({ statusCode: status, code, error: reason, message: reason })
      this.#res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) })
      this.#res.end(body)
      return
    }
    // Ended because every job ended: the id makes the browser's automatic reconnect a 204.
    this.#res.end(sseFrame('close', { code, reason }, code === CloseCodes.normal ? SSE_DONE_ID : undefined))
  }

  terminate (): void {
    this.#res.destroy()
  }

  keepalive (): void {
    // The protocol's heartbeat comments keep proxies from timing the stream out; a vanished peer
    // shows as a failed write.
  }
}

export interface SseRouteOptions {
  kinds: Array<{ kind: string, basePath: string }>
  /** The multiplexed stream's path; false leaves it out. */
  path: string | false
  retryMs: number
  maxSubscriptionsPerConnection: number
}

/** `?logs=1` (from the oldest line kept) or `?logs_from=<offset>`; undefined when neither. */
function logsAsked (request: FastifyRequest): LogsRequest | undefined {
  const query = request.query as Record<string, unknown> | undefined
  if (typeof query?.logs_from === 'number') return { from: query.logs_from }
  if (query?.logs === '1' || query?.logs === 'true') return { from: null }
  return undefined
}

/**
 * `?streams_from=<name>:<offset>,<jobId>@<name>:<offset>`: one SSE connection resends a single
 * Last-Event-ID, so the offsets of several streams or jobs come in the URL; the Last-Event-ID,
 * when it names a chunk, moves its one stream on past it. Undefined for a job that asked for none.
 */
export function streamsAsked (request: FastifyRequest, jobId: string, last: string | undefined): StreamsRequest | undefined {
  const raw = (request.query as Record<string, unknown> | undefined)?.streams_from
  let out: StreamsRequest | undefined
  for (const entry of typeof raw === 'string' ? raw.split(',') : []) {
    const at = entry.indexOf('@')
    if (at >= 0 && entry.slice(0, at) !== jobId) continue
    const spec = entry.slice(at + 1)
    const colon = spec.lastIndexOf(':')
    const name = spec.slice(0, colon)
    const from = Number(spec.slice(colon + 1))
    if (colon <= 0 || !isStreamName(name) || !Number.isSafeInteger(from) || from < 0) continue
    out ??= {}
    if (Object.keys(out).length < MAX_STREAMS_PER_JOB || name in out) out[name] = from
  }
  const resumed = streamResume(last, jobId)
  if (resumed !== null && out !== undefined && resumed.name in out && resumed.from > out[resumed.name]) out[resumed.name] = resumed.from
  return out
}

export function lastEventId (request: FastifyRequest): string | undefined {
  const header = request.headers['last-event-id']
  if (typeof header === 'string') return header
  // EventSource cannot set headers on its first request; a client resuming by hand may use the query.
  const query = (request.query as Record<string, unknown>)?.lastEventId
  return typeof query === 'string' ? query : undefined
}

/** `GET <basePath>/:jobId/events` for every kind, and `GET <path>?jobs=<id>,<id>` for several jobs (unless path is false). */
export function registerSseRoutes (fastify: FastifyInstance, ctx: SessionContext, opts: SseRouteOptions): void {
  const perJob = sseProtocol(true)
  const multiplexed = sseProtocol(false)
  const serve = (request: FastifyRequest, reply: FastifyReply, protocol: typeof perJob, jobs: InitialJob[]): void => {
    // The client already has every job's final state: stop its reconnecting.
    const last = lastEventId(request)
    if (last === SSE_DONE_ID) {
      void reply.code(204).send()
      return
    }
    const logs = logsAsked(request)
    if (logs !== undefined) for (const job of jobs) job.logs = { from: logResume(last, job.jobId) ?? logs.from }
    for (const job of jobs) job.streams = streamsAsked(request, job.jobId, last)
    reply.hijack()
    // eslint-disable-next-line no-new
    new Session(ctx, protocol, new SseTransport(reply, opts.retryMs), request, jobs)
  }
  for (const { kind, basePath } of opts.kinds) {
    fastify.get(`${basePath}/:jobId/events`, { schema: sseSchema(true) }, (request, reply) => {
      serve(request, reply, perJob, [{ kind, jobId: (request.params as { jobId: string }).jobId }])
    })
  }
  if (opts.path === false) return
  fastify.get(opts.path, { schema: sseSchema(false) }, (request, reply) => {
    const raw = (request.query as Record<string, unknown>)?.jobs
    const ids = [...new Set((Array.isArray(raw) ? raw.join(',') : typeof raw === 'string' ? raw : '').split(',').map(s => s.trim()).filter(s => s !== ''))]
    if (ids.length === 0) {
      void reply.code(400).send({ statusCode: 400, error: 'Bad Request', message: 'Name the jobs to watch: ?jobs=<id>,<id>' })
      return
    }
    if (ids.length > opts.maxSubscriptionsPerConnection) {
      void reply.code(400).send({ statusCode: 400, error: 'Bad Request', message: `Too many jobs: at most ${opts.maxSubscriptionsPerConnection} per stream` })
      return
    }
    serve(request, reply, multiplexed, ids.map(jobId => ({ jobId })))
  })
}
