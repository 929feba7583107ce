import { createHash } from 'node:crypto'
import type { BridgeEvent } from '../../bridge/bridge'
import { parseProgress, type JobEvent } from '../../core/event'
import type { ResolvedWebhooks } from './options'

// What a delivery says and how it is named, from a stream entry alone (the job may be gone):
// the payload's event, the delivery id and the retry schedule. Pure functions, table-tested.

/** The internal event of a stream entry, read from the entry alone: the job may be gone already. */
export function eventOf (kind: string, e: BridgeEvent, progress: string | null = null): JobEvent | null {
  const base = { kind, jobId: e.jobId, processed: 0, total: 0, attempt: 1, etaSeconds: null, ts: e.t }
  const json = (text: string | undefined | null): unknown => {
    if (text === undefined || text === null || text === '') return null
    try {
      return JSON.parse(text)
    } catch {
      return text
    }
  }
  switch (e.event) {
    case 'progress': {
      const p = parseProgress(json(e.fields.data))
      return { ...base, state: 'active', processed: p.processed, total: p.total, attempt: p.attempt ?? 1 }
    }
    case 'active':
      return { ...base, state: 'active' }
    case 'waiting':
    case 'delayed':
    case 'stalled':
      return { ...base, state: 'queued' }
    case 'completed': {
      const p = parseProgress(json(progress))
      return { ...base, state: 'completed', processed: p.total > 0 ? p.total : p.processed, total: p.total, etaSeconds: 0, result: json(e.fields.returnvalue) }
    }
    case 'failed':
      return { ...base, state: 'failed', error: e.fields.failedReason ?? 'failed' }
    case 'cancelled':
      return { ...base, state: 'cancelled', error: 'cancelled' }
    default:
      return null
  }
}

/** Exponential backoff with jitter, never shorter than what the receiver asked for. */
export function retryDelay (o: Pick<ResolvedWebhooks, 'backoffMs' | 'maxBackoffMs' | 'jitter' | 'maxRetryAfterMs'>, attemptsMade: number, retryAfterMs: number | null, random = Math.random()): number {
  const base = Math.min(o.maxBackoffMs, o.backoffMs * 2 ** Math.max(0, attemptsMade - 1))
  const delay = Math.round(base * (1 + o.jitter * (2 * random - 1)))
  return retryAfterMs === null ? delay : Math.max(delay, Math.min(retryAfterMs, o.maxRetryAfterMs))
}

/**
 * The delivery id (`webhook-id`): the same for every handling of one event to one endpoint.
 * `event` is the stream entry id for progress and status events, and {@link finalKey} (state and
 * attempt) for a final state, which a stream gap's recovery finds without its entry.
 */
export function deliveryId (queue: string, jobId: string, event: string, url: string): string {
  return 'msg_' + createHash('sha256').update(`${queue}\n${jobId}\n${event}\n${url}`).digest('base64url').slice(0, 27)
}
