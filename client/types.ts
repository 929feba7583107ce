import type { JobStatus } from '../lib/wire/messages'

export type { JobStatus }

/** A job's state as the client hands it out, whatever transport carried it. */
export interface JobUpdate {
  kind: string
  jobId: string
  status: JobStatus
  /** Percent done, 0-100. */
  progress: number
  processed: number
  total: number
  etaSeconds: number | null
  /** The return value, once `succeeded` (polling fetches it from the result route). */
  result: unknown
  /** Why it ended, on `failed` and `cancelled`. */
  error: string | null
  /** The job's continuity version, when the server sent one. */
  version?: string
  /** The worker's stage, message and small data, when it reported them. */
  stage?: string
  message?: string
  data?: unknown
}

export type Transport = 'websocket' | 'sse' | 'polling'

/**
 * `connecting` before the first connection; `live` on WebSocket; `fallback` live on SSE or
 * polling; `reconnecting` while waiting to try again; `offline` when the browser says it is.
 * `idle` when nothing is watched (no connection is held).
 */
export type ConnectionState = 'idle' | 'connecting' | 'live' | 'fallback' | 'reconnecting' | 'offline'

export interface ConnectionEvent {
  state: ConnectionState
  transport: Transport | null
  /** Delay before the next attempt, when `reconnecting`. */
  retryInMs?: number
  error?: Error
}
