/**
 * The message shapes of the plugin's own protocols, as a client sees them. The server renders
 * them (lib/protocols) and the client reads them; both import these types from here.
 *
 * This module has no server dependencies.
 */

/** Seed 000's per-job message (`/ws/<kind>/<jobId>` and the status route): exactly these fields. */
export interface ProgressMessage {
  job_id: string
  status: 'processing' | 'complete' | 'failed' | 'cancelled'
  progress: number
  processed: number
  total: number
  eta_seconds: number | null
  /** On `failed` and `cancelled`. */
  error?: string
  /** The job's version (lib/wire/version.ts); only when the protocol's `version` option is on. */
  version?: string
  /** The worker's stage, message and small data; only with the plugin's `progressDetails` option. */
  stage?: string
  message?: string
  data?: unknown
}

export type JobStatus = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled'

/** What the `jobs` protocol, and SSE, send for a job event. */
export interface JobUpdateMessage {
  type: 'job_update'
  job_id: string
  status: JobStatus
  /** The job's return value on `succeeded`, else null. */
  result: unknown
  /** Why it ended on `failed` and `cancelled`, else null. */
  error: string | null
  /** Beyond the seed: percent done (0-100, one decimal), items done and in all, ETA. */
  progress: number
  processed: number
  total: number
  eta_seconds: number | null
  /** Unix time, seconds. */
  ts: number
  /** The job's version (lib/wire/version.ts), whenever the server knows it. */
  version?: string
  /** The worker's stage, message and small data, when it reported them. */
  stage?: string
  message?: string
  data?: unknown
}

/** The other server messages of the `jobs` protocol. */
export type JobsControlMessage =
  | { type: 'connected', message: string, ts: number }
  | { type: 'subscribed', job_id: string, ts: number }
  | { type: 'unsubscribed', job_id: string, ts: number }
  | { type: 'error', message: string, job_id?: string, ts: number }
  | { type: 'heartbeat', ts: number }
  | { type: 'pong', ts: number }

/**
 * A line of the job's log (asked for with `logs` on subscribe). `offset` is absolute: the line's
 * number in the job's log since its start, unchanged by `keepLogs` trimming.
 */
export interface LogLineMessage { type: 'log', job_id: string, offset: number, line: string, ts: number }

/**
 * Lines `from` up to `next` (excluded) were not sent (the client fell behind, the catch-up was
 * over its cap, or they were trimmed): fetch them from `GET <basePath>/:jobId/logs?from=<from>`.
 * Lines from `next` on follow.
 */
export interface LogsTruncatedMessage { type: 'logs_truncated', job_id: string, from: number, next: number, ts: number }

export type LogMessage = LogLineMessage | LogsTruncatedMessage

/** My jobs' feed: a job of the caller's was created (`created`) or changed state. */
export interface MyJobMessage {
  type: 'my_job'
  job_id: string
  kind: string
  status: JobStatus | 'removed'
  created?: boolean
  /**
   * The BullMQ event stream entry id of the change (absent on `created`): two instances' bridges
   * may publish one job's changes out of order, and an instance passes on only what is newer.
   */
  version?: string
  ts: number
}

/**
 * On the caller's jobs feed after this instance's subscription to it was lost and made again (a
 * reconnect, a failover, a slot that moved): changes published meanwhile may be missing, so the
 * list is to be read again (`GET /jobs`).
 */
export interface MyJobsResyncMessage {
  type: 'my_jobs_resync'
  ts: number
}

export type JobsServerMessage = JobUpdateMessage | JobsControlMessage | LogMessage | MyJobMessage | MyJobsResyncMessage

/** What a client sends on the `jobs` protocol. */
export type JobsClientMessage =
  | { action: 'subscribe', job_id: string, logs?: true | { from: number } }
  | { action: 'unsubscribe', job_id: string }
  | { action: 'subscribe_mine' | 'unsubscribe_mine' }
  | { action: 'ping' }

/**
 * Server-Sent Events: `event:` names. `job_update` carries a {@link JobUpdateMessage} and has an
 * `id:` (see {@link sseEventId}); `error` a `{ message, job_id? }`; `close` a `{ code, reason }`
 * just before the server ends the stream (codes of lib/wire/close-codes.ts). With `logs=1` or
 * `logs_from=<offset>`: `log` ({@link LogLineMessage}, id `<jobId>@log.<offset>`) and
 * `logs_truncated`. On `GET /jobs/events`: `my_job` ({@link MyJobMessage}) and `my_jobs_resync`
 * ({@link MyJobsResyncMessage}).
 */
export type SseEventName = 'job_update' | 'error' | 'close' | 'log' | 'logs_truncated' | 'my_job' | 'my_jobs_resync'

export function isFinalStatus (status: string): boolean {
  return status === 'succeeded' || status === 'failed' || status === 'cancelled' || status === 'complete'
}
