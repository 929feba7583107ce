import type { JobEvent } from '../core/event'
import { sseEventId, sseFrame } from '../wire/sse-frame'
import { streamEventId } from '../wire/streams'
import { jobUpdate } from './jobs'
import type { ProtocolDefinition } from './types'

/**
 * A job's version for the event id: the continuity version when the event has one; otherwise one
 * made from what every instance reads alike for the same state, so the id still tells states apart.
 */
/** The version part of a log line's event id: `<jobId>@log.<offset>`. */
export const LOG_ID = 'log.'

/** The offset to resume a job's logs after, from a Last-Event-ID that names one of its lines. */
export function logResume (lastEventId: string | undefined, jobId: string): number | null {
  const prefix = `${jobId}@${LOG_ID}`
  if (lastEventId === undefined || !lastEventId.startsWith(prefix)) return null
  const n = Number(lastEventId.slice(prefix.length))
  return Number.isSafeInteger(n) && n >= 0 ? n + 1 : null
}

function versionOf (event: JobEvent): string {
  return event.version ?? `${event.attempt}.${event.state}.${Math.floor(event.processed)}`
}

function render (event: JobEvent): string {
  return sseFrame('job_update', jobUpdate(event), sseEventId(event.jobId, versionOf(event)))
}

/**
 * Server-Sent Events: the `jobs` protocol's `job_update` messages (with `version`) as
 * `event: job_update`, errors as `event: error`, comments as heartbeats. `perJob`: the stream of
 * one job named in the path (not found answers 404); otherwise a multiplexed stream of the jobs
 * named in the query (a job that is not found is an `error` event, the others go on).
 */
export function sseProtocol (perJob: boolean): ProtocolDefinition {
  return {
    name: perJob ? 'sse' : 'sse-multiplexed',
    path: '',
    perJob,
    closeOnFinal: true,
    render,
    error: (message, jobId) => sseFrame('error', { message, ...(jobId !== undefined ? { job_id: jobId } : {}) }),
    heartbeat: () => ': heartbeat\n\n',
    // A line's id names its offset: a browser that reconnects by itself sends it back as
    // Last-Event-ID, and the stream resumes after that line.
    logs: (message) => sseFrame(message.type, message, message.type === 'log' ? sseEventId(message.job_id, `${LOG_ID}${message.offset}`) : undefined),
    // A chunk's id names its stream and offset in a namespace of its own (`stream.`), so a
    // stream named `log` cannot be taken for a log line.
    streams: (message) => sseFrame(message.type, message, message.type === 'stream' ? sseEventId(message.job_id, streamEventId(message.name, message.offset)) : undefined),
    mine: (message) => sseFrame(message.type === 'my_job' ? 'my_job' : 'my_jobs_resync', message)
  }
}
