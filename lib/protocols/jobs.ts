import { percent, type JobEvent } from '../core/event'
import type { JobUpdateMessage } from '../wire/messages'
import { parseLogsRequest } from '../channels/logs/live-logs'
import { parseStreamsRequest } from '../channels/streams/live-streams'
import type { ClientAction, ProtocolDefinition } from './types'

export type { JobUpdateMessage }

const STATUS = { queued: 'queued', active: 'running', completed: 'succeeded', failed: 'failed', cancelled: 'cancelled' } as const

/** Whole seconds since the epoch: the seed's `ts` is an integer Unix time. */
const ts = (): number => Math.floor(Date.now() / 1000)

/**
 * Renders the internal event as a `job_update`. It is sent on every change, not only on status
 * transitions, so it also carries the progress fields; a client that only reads `status` sees
 * the same status more than once, which the seed's clients handle.
 */
export function jobUpdate (event: JobEvent): JobUpdateMessage {
  const message: JobUpdateMessage = {
    type: 'job_update',
    job_id: event.jobId,
    status: STATUS[event.state],
    result: event.state === 'completed' ? event.result ?? null : null,
    error: event.state === 'failed' || event.state === 'cancelled' ? event.error ?? event.state : null,
    progress: percent(event),
    processed: Math.floor(event.processed),
    total: Math.floor(event.total),
    eta_seconds: event.etaSeconds,
    ts: Math.floor(event.ts / 1000)
  }
  // Absent rather than undefined: JSON.stringify would drop it anyway, tests compare objects.
  // Set one by one in this order, not spread: one object per state rendered, not four.
  if (event.version !== undefined) message.version = event.version
  if (event.stage !== undefined) message.stage = event.stage
  if (event.message !== undefined) message.message = event.message
  if (event.data !== undefined) message.data = event.data
  return message
}

const USAGE = 'send {"action": "subscribe" | "unsubscribe", "job_id": "<uuid>"} (subscribe takes "logs": true | {"from": <offset>} and "streams": {"<name>": <offset>}), {"action": "subscribe_mine" | "unsubscribe_mine"} or {"action": "ping"}'

function parseJobsAction (text: string): ClientAction {
  let message: unknown
  try {
    message = JSON.parse(text)
  } catch {
    return { type: 'invalid', message: `Invalid JSON: ${USAGE}` }
  }
  if (message === null || typeof message !== 'object' || Array.isArray(message)) return { type: 'invalid', message: `Messages must be JSON objects: ${USAGE}` }
  const { action, job_id: jobId, logs, streams } = message as Record<string, unknown>
  switch (action) {
    case 'subscribe': {
      if (typeof jobId !== 'string' || jobId === '') return { type: 'invalid', message: `Missing job_id for ${action}` }
      const asked = parseLogsRequest(logs)
      if (asked === null) return { type: 'invalid', message: 'logs must be true or {"from": <offset, an integer from 0>}' }
      const named = parseStreamsRequest(streams)
      if (named === null) return { type: 'invalid', message: 'streams must be {"<name>": <offset, an integer from 0>}, at most 16 names' }
      if (asked === undefined && named === undefined) return { type: action, jobId }
      return { type: action, jobId, ...(asked !== undefined ? { logs: asked } : {}), ...(named !== undefined ? { streams: named } : {}) }
    }
    case 'subscribe_mine':
    case 'unsubscribe_mine':
      return { type: action }
    case 'unsubscribe':
      if (typeof jobId !== 'string' || jobId === '') return { type: 'invalid', message: `Missing job_id for ${action}` }
      return { type: action, jobId }
    case 'ping':
      return { type: 'ping' }
    default: {
      const name = typeof action === 'string' ? action.slice(0, 64) : JSON.stringify(action ?? null).slice(0, 64)
      return { type: 'invalid', message: `Unknown action: ${name} (expected subscribe, unsubscribe, subscribe_mine, unsubscribe_mine or ping)` }
    }
  }
}

export interface JobsProtocolOptions {
  /** Route path. @default '/ws/jobs' */
  path?: string
  /** See {@link ProtocolDefinition.auth}. @default 'request' */
  auth?: 'request' | 'first-message'
}

/**
 * `jobs`: one socket, many subscriptions; typed events with a Unix `ts`, heartbeats, and errors
 * the connection survives.
 */
export function jobsProtocol (opts: JobsProtocolOptions = {}): ProtocolDefinition {
  return {
    name: 'jobs',
    path: opts.path ?? '/ws/jobs',
    auth: opts.auth ?? 'request',
    parse: parseJobsAction,
    render: jobUpdate,
    connected: () => ({ type: 'connected', message: 'WebSocket connection established', ts: ts() }),
    authFailed: (reason) => ({ type: 'error', message: reason, ts: ts() }),
    subscribed: (jobId) => ({ type: 'subscribed', job_id: jobId, ts: ts() }),
    unsubscribed: (jobId) => ({ type: 'unsubscribed', job_id: jobId, ts: ts() }),
    error: (message, jobId) => ({ type: 'error', message, ...(jobId !== undefined ? { job_id: jobId } : {}), ts: ts() }),
    heartbeat: () => ({ type: 'heartbeat', ts: ts() }),
    logs: (message) => message,
    streams: (message) => message,
    mine: (message) => message,
    pong: () => ({ type: 'pong', ts: ts() })
  }
}
