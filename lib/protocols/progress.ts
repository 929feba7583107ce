import { isFinal, percent, type JobEvent } from '../events'
import type { ProtocolDefinition } from './types'

const STATUS = { queued: 'processing', active: 'processing', completed: 'complete', failed: 'failed', cancelled: 'cancelled' } as const

/** Seed 000's message: exactly these fields, plus `error` on failed and cancelled. */
export interface ProgressMessage {
  job_id: string
  status: 'processing' | 'complete' | 'failed' | 'cancelled'
  progress: number
  processed: number
  total: number
  eta_seconds: number | null
  error?: string
}

/** Renders the internal event as seed 000's progress message (also the status route's body). */
export function progressMessage (event: JobEvent): ProgressMessage {
  const message: ProgressMessage = {
    job_id: event.jobId,
    status: STATUS[event.state],
    progress: percent(event),
    processed: Math.floor(event.processed),
    total: Math.floor(event.total),
    eta_seconds: event.etaSeconds
  }
  if (isFinal(event.state) && event.error !== undefined) message.error = event.error
  return message
}

/**
 * `progress`: one socket per job at `<wsPrefix>/<kind>/:jobId`; a snapshot at once, then every
 * change, then the final message and a 1000 close. Text frames (the seed's `ping`) are ignored.
 */
export function progressProtocol (wsPrefix: string): ProtocolDefinition {
  return {
    name: 'progress',
    path: wsPrefix,
    perJob: true,
    closeOnFinal: true,
    render: progressMessage
  }
}
