import type { JobEvent } from '../events'
import { sseEventId, sseFrame } from '../wire/sse'
import { jobUpdate } from './jobs'
import type { ProtocolDefinition } from './types'

/**
 * A job's version for the event id: the continuity version when the event has one; otherwise one
 * made from what every instance reads alike for the same state, so the id still tells states apart.
 */
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
    heartbeat: () => ': heartbeat\n\n'
  }
}
