import type { FastifyBaseLogger } from 'fastify'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import { SESSION_EXPIRED, TOKEN_EXPIRED } from '../core/access'
import { CloseCodes } from '../wire/close-codes'
import type { Session } from './session'
import { serialize } from './render'

export interface SessionTimerOptions {
  pingIntervalMs: number
  heartbeatIntervalMs: number
  sendTimeoutMs: number
  log: FastifyBaseLogger
  /** Where slow-client cut-offs are counted. @default reports nowhere */
  telemetry?: Telemetry
}

/** Most slices one sweep's period is cut into: each tick visits one slice of the sessions. */
const SLICES = 100
/** Shortest tick of a sweep: a short period is cut into fewer slices. */
const MIN_TICK_MS = 100

/**
 * Visits every session once per `periodMs`, a slice of them per tick, not all of them in one
 * turn of the event loop: at 100,000 sockets one turn that pings them all is a stall of every
 * socket's messages. A round starts every `periodMs` with the sessions there are then, each tick
 * visiting its share; one that opens during a round is visited in it if it comes after the
 * sweep's place (a Set iterates in insertion order and sees what is added behind it).
 */
function sweep (sessions: Set<Session>, periodMs: number, visit: (session: Session, now: number) => void): NodeJS.Timeout {
  const slices = Math.max(1, Math.min(SLICES, Math.floor(periodMs / MIN_TICK_MS)))
  let tick = 0
  let round: IterableIterator<Session> | null = null
  let quota = 0
  return setInterval(() => {
    if (tick++ % slices === 0) {
      round = sessions.values()
      quota = Math.ceil(sessions.size / slices)
    }
    if (round === null) return
    const now = Date.now()
    for (let i = 0; i < quota; i++) {
      const next = round.next()
      if (next.done === true) {
        round = null
        return
      }
      visit(next.value, now)
    }
  }, periodMs / slices).unref()
}

/**
 * The three sweeps over an instance's sessions, whatever their transport: keepalive (WebSocket
 * ping/pong ends peers that vanished without a close; SSE writes a comment so proxies keep the
 * stream), the protocols' heartbeats, and, at most a second apart, the cut-off for clients whose
 * sends have not drained in time and the close of connections whose credential expired. One
 * timer each per instance, never one per connection, and each spread over its period (see
 * {@link sweep}). Returns the function that stops them.
 */
export function startSessionTimers (sessions: Set<Session>, opts: SessionTimerOptions): () => void {
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
  const slow = sweep(sessions, Math.min(1_000, Math.ceil(opts.sendTimeoutMs / 4)), (session, now) => {
    // A connection lives no longer than the credential it authenticated with (a session's
    // `maxAgeSeconds`, a watch token's expiry); the client's next connection is refused alike.
    const expiresAt = session.identity?.expiresAt
    if (expiresAt !== undefined && expiresAt <= now) {
      session.close(CloseCodes.unauthorized, session.identity?.via === 'token' ? TOKEN_EXPIRED : SESSION_EXPIRED)
      return
    }
    if (session.outbox.stalledFor(now) > opts.sendTimeoutMs) {
      opts.log.info({ owner: session.owner }, 'job-progress: closing a client that does not read its messages')
      // No close frame: it would wait behind what the client does not read.
      session.transport.terminate()
      telemetry.count('slowClientsClosed')
    }
  })
  return () => {
    clearInterval(ping)
    if (heartbeat !== null) clearInterval(heartbeat)
    clearInterval(slow)
  }
}
