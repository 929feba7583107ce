import type { FastifyBaseLogger } from 'fastify'
import { noTelemetry, type Telemetry } from '../core/telemetry'
import { SESSION_EXPIRED, TOKEN_EXPIRED } from '../core/access'
import { CloseCodes } from '../wire/close-codes'
import type { Session } from './session'

export interface SessionTimerOptions {
  pingIntervalMs: number
  heartbeatIntervalMs: number
  sendTimeoutMs: number
  log: FastifyBaseLogger
  /** Where slow-client cut-offs are counted. @default reports nowhere */
  telemetry?: Telemetry
}

/**
 * The three sweeps over an instance's sessions, whatever their transport: keepalive (WebSocket
 * ping/pong ends peers that vanished without a close; SSE writes a comment so proxies keep the
 * stream), the protocols' heartbeats, and, at most a second apart, the cut-off for clients whose
 * sends have not drained in time and the close of connections whose credential expired. One
 * timer each per instance, never one per connection. Returns the function that stops
 * them.
 */
export function startSessionTimers (sessions: Set<Session>, opts: SessionTimerOptions): () => void {
  const telemetry = opts.telemetry ?? noTelemetry
  const ping = setInterval(() => {
    for (const session of sessions) session.transport.keepalive()
  }, opts.pingIntervalMs).unref()
  const heartbeat = setInterval(() => {
    for (const session of sessions) {
      // An SSE stream's first byte is its 200: none before its job is known to be the caller's,
      // so that a refusal can still be a plain 404. The jobs feed gets them too: a write is how a
      // stream finds its peer gone (a reset answers it), and with it the slot the stream holds.
      if (session.owner === null || session.protocol.heartbeat === undefined) continue
      if (session.transport.kind === 'sse' && session.subscriptions === 0 && !session.followsMine) continue
      session.sendControl(session.protocol.heartbeat())
    }
  }, opts.heartbeatIntervalMs).unref()
  const slow = setInterval(() => {
    const now = Date.now()
    for (const session of sessions) {
      // A connection lives no longer than the credential it authenticated with (a session's
      // `maxAgeSeconds`, a watch token's expiry); the client's next connection is refused alike.
      const expiresAt = session.identity?.expiresAt
      if (expiresAt !== undefined && expiresAt <= now) {
        session.close(CloseCodes.unauthorized, session.identity?.via === 'token' ? TOKEN_EXPIRED : SESSION_EXPIRED)
        continue
      }
      if (session.outbox.stalledFor(now) > opts.sendTimeoutMs) {
        opts.log.info({ owner: session.owner }, 'job-progress: closing a client that does not read its messages')
        // No close frame: it would wait behind what the client does not read.
        session.transport.terminate()
        telemetry.count('slowClientsClosed')
      }
    }
  }, Math.min(1_000, Math.ceil(opts.sendTimeoutMs / 4))).unref()
  return () => {
    clearInterval(ping)
    clearInterval(heartbeat)
    clearInterval(slow)
  }
}
