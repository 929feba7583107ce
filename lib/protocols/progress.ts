import { isFinal, percent, type JobEvent } from '../core/event'
import { detailFields } from '../core/progress-details'
import type { ProgressMessage } from '../wire/messages'
import type { ProtocolDefinition } from './types'

export type { ProgressMessage }

const STATUS = { queued: 'processing', active: 'processing', completed: 'complete', failed: 'failed', cancelled: 'cancelled' } as const

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
 * `version: true` adds the job's version to each message (off by default: seed 000's format is
 * exact).
 */
export function progressProtocol (wsPrefix: string, opts: { version?: boolean, details?: boolean } = {}): ProtocolDefinition {
  const base = opts.version === true ? versionedProgressMessage : progressMessage
  return {
    name: 'progress',
    path: wsPrefix,
    perJob: true,
    closeOnFinal: true,
    // Seed 000's clients compare the message exactly: the version only when asked for.
    render: opts.details === true ? (event) => detailedProgressMessage(event, base) : base
  }
}

/** Seed 000's message plus the job's version, when the event has one. */
export function versionedProgressMessage (event: JobEvent): ProgressMessage {
  const message = progressMessage(event)
  if (event.version !== undefined) message.version = event.version
  return message
}

/** Seed 000's message plus the worker's stage, message and data (the `progressDetails` option). */
export function detailedProgressMessage (event: JobEvent, render: (event: JobEvent) => ProgressMessage = progressMessage): ProgressMessage {
  return { ...render(event), ...detailFields(event) }
}
