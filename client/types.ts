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

export interface ClientOptions {
  /** The API's origin. @default location.origin in a browser */
  baseUrl?: string
  /** An API key: `Authorization: Bearer` on HTTP; on the WebSocket as `apiKeyVia` says. */
  apiKey?: string
  /**
   * How the WebSocket carries `apiKey` (browsers cannot set its headers): a subprotocol, the
   * `api_key` query parameter, or a first `{ "token" }` message (for a `first-message` protocol).
   * @default 'subprotocol'
   */
  apiKeyVia?: 'subprotocol' | 'query' | 'first-message'
  /** fetch's credentials mode: cookie sessions across origins need 'include'. @default 'same-origin' */
  credentials?: RequestCredentials
  /** Transports to use, best first. @default ['websocket', 'sse', 'polling'] */
  transports?: Transport[]
  /** The `jobs` protocol's path. @default '/ws/jobs' */
  wsPath?: string
  /** The multiplexed SSE stream's path (the plugin's `ssePath`). @default '/job-progress/events' */
  ssePath?: string
  /** The caller's jobs (the plugin's `myJobs.path`); its feed is `<myJobsPath>/events`. @default '/job-progress/jobs' */
  myJobsPath?: string
  /** Routes of a kind. @default `/<kind>/upload`, `/<kind>/<id>/status`, `/result`, `/cancel` */
  paths?: Partial<{
    upload: (kind: string) => string
    status: (kind: string, jobId: string) => string
    result: (kind: string, jobId: string) => string
    cancel: (kind: string, jobId: string) => string
  }>
  /** Reconnect delays: full jitter between 0 and min(maxMs, minMs × 2^attempt). @default { minMs: 1000, maxMs: 30000 } */
  backoff?: { minMs?: number, maxMs?: number }
  /** Failed attempts on a transport before falling back to the next. @default 2 */
  fallbackAfter?: number
  /** How often to try the better transport again while on a fallback. @default 30000 */
  upgradeIntervalMs?: number
  /** Reconnect when nothing (not even a heartbeat) arrived for this long. @default 75000 */
  heartbeatTimeoutMs?: number
  /** Polling interval. @default 2000 */
  pollIntervalMs?: number
  /** For Node or tests: the implementations to use. @default the globals */
  fetch?: typeof fetch
  WebSocket?: typeof WebSocket
}

export interface UploadOptions {
  /** Other form fields, sent before the file. */
  fields?: Record<string, string>
  /** Upload progress (bytes sent, bytes in all). In Node, called once at the end. */
  onUploadProgress?: (loaded: number, total: number) => void
  signal?: AbortSignal
  /** The file's name when `file` is a Blob without one. */
  filename?: string
}
