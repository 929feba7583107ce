import type { FastifyBaseLogger } from 'fastify'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import { SESSION_EXPIRED, TOKEN_EXPIRED } from '../core/access'
import { CloseCodes } from '../wire/close-codes'
import type { Session } from './session'
import { serialize } from './render'
import { BUCKETS, SessionRegistry, type BucketSet } from './session-set'

export interface SessionTimerOptions {
  pingIntervalMs: number
  heartbeatIntervalMs: number
  sendTimeoutMs: number
  log: FastifyBaseLogger
  /** Where slow-client cut-offs are counted. @default reports nowhere */
  telemetry?: Telemetry
}

/** The instance's sessions (see {@link SessionRegistry}). */
export class SessionSet extends SessionRegistry<Session> {}

/** Shortest tick of a sweep: a short period is cut into fewer slices. */
const MIN_TICK_MS = 100

/**
 * Visits every session once per `periodMs`, a slice of the buckets per tick, not all of them in
 * one turn of the event loop: at 100,000 sockets one turn that pings them all is a stall of every
 * socket's messages. Tick `t` of `k` slices visits the buckets `b` with `b % k === t % k`, so each
 * bucket, and each session, comes once per period, at the same place.
 */
function sweep (sessions: BucketSet<Session>, periodMs: number, visit: (session: Session, now: number) => void): NodeJS.Timeout {
  const slices = Math.max(1, Math.min(BUCKETS, Math.floor(periodMs / MIN_TICK_MS)))
  let tick = 0
  return setInterval(() => {
    const slice = tick++ % slices
    const now = Date.now()
    for (let b = slice; b < BUCKETS; b += slices) {
      for (const session of sessions.bucket(b)) visit(session, now)
    }
  }, periodMs / slices).unref()
}

/**
 * The sweeps over an instance's sessions, whatever their transport: keepalive (WebSocket
 * ping/pong ends peers that vanished without a close; SSE writes a comment so proxies keep the
 * stream), the protocols' heartbeats, and, at most a second apart, the cut-off for clients whose
 * sends have not drained in time (over the sessions with a send in flight) and the close of
 * connections whose credential expired (over those whose credential expires). One timer each per
 * instance, never one per connection, the sweeps over all sessions spread over their period (see
 * {@link sweep}). Returns the function that stops them.
 */
export function startSessionTimers (sessions: SessionSet, opts: SessionTimerOptions): () => void {
  const telemetry = opts.telemetry ?? noTelemetry
  // A heartbeat is the same for every session of a protocol at one instant: rendered once per
  // protocol and second, and its bytes (framed once) shared by every socket.
  const rendered = new Map<Session['protocol'], { at: number, bytes: Buffer | undefined }>()
  const beat = (session: Session, now: number): void => {
    // An SSE stream's first byte is its 200: none before its job is known to be the caller's,
    // so that a refusal can still be a plain 404. The jobs feed gets them too: a write is how a
    // stream finds its peer gone (a reset answers it), and with it the slot the stream holds.
    const protocol = session.protocol
    if (session.owner === null || protocol.heartbeat === undefined || !session.serving) return
    if (session.transport.kind === 'sse' && session.subscriptions === 0 && !session.followsMine) return
    const second = Math.floor(now / 1000)
    let r = rendered.get(protocol)
    if (r === undefined || r.at !== second) {
      const data = serialize(protocol.heartbeat())
      rendered.set(protocol, r = { at: second, bytes: data === undefined ? undefined : Buffer.from(data) })
    }
    if (r.bytes !== undefined) session.outbox.send(r.bytes)
  }
  // At the same period (the default), a socket's heartbeat and ping go out together, in one
  // write: an idle socket costs the instance one write and one read (the pong) per period.
  const together = opts.pingIntervalMs === opts.heartbeatIntervalMs
  const ping = sweep(sessions, opts.pingIntervalMs, together
    ? (session, now) => { beat(session, now); session.transport.keepalive() }
    : (session) => session.transport.keepalive())
  const heartbeat = together ? null : sweep(sessions, opts.heartbeatIntervalMs, beat)
  const checkMs = Math.min(1_000, Math.ceil(opts.sendTimeoutMs / 4))
  const expiry = sweep(sessions.expiring, checkMs, (session, now) => {
    // A connection lives no longer than the credential it authenticated with (a session's
    // `maxAgeSeconds`, a watch token's expiry); the client's next connection is refused alike.
    const expiresAt = session.identity?.expiresAt
    if (expiresAt !== undefined && expiresAt <= now) {
      session.close(CloseCodes.unauthorized, session.identity?.via === 'token' ? TOKEN_EXPIRED : SESSION_EXPIRED)
    }
  })
  // Every tenth of the check period, the sessions that sent since: those flushed since are let
  // go (a message sent again puts them back), the others are checked until they flush.
  const stalls = setInterval(() => {
    const now = Date.now()
    for (const session of sessions.busy) {
      const stalled = session.outbox.stalledFor(now)
      if (stalled === 0) {
        sessions.busy.delete(session)
      } else if (stalled > opts.sendTimeoutMs) {
        sessions.busy.delete(session)
        opts.log.info({ owner: session.owner }, 'job-progress: closing a client that does not read its messages')
        // No close frame: it would wait behind what the client does not read.
        session.transport.terminate()
        telemetry.count('slowClientsClosed')
      }
    }
  }, checkMs / 10).unref()
  return () => {
    clearInterval(ping)
    if (heartbeat !== null) clearInterval(heartbeat)
    clearInterval(expiry)
    clearInterval(stalls)
  }
}
