import type { FastifyBaseLogger } from 'fastify'
import { noTelemetry, type Telemetry } from '../core/telemetry'
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
 * stream), the protocols' heartbeats, and the cut-off for clients whose sends have not drained in
 * time. One timer each per instance, never one per connection. Returns the function that stops
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
      // so that a refusal can still be a plain 404.
      if (session.owner === null || session.protocol.heartbeat === undefined) continue
      if (session.transport.kind === 'sse' && session.subscriptions === 0) continue
      session.sendControl(session.protocol.heartbeat())
    }
  }, opts.heartbeatIntervalMs).unref()
  const slow = setInterval(() => {
    const now = Date.now()
    for (const session of sessions) {
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
