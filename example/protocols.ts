import { defineProtocol, progressMessage, type ClientAction, type JobEvent, type ProtocolDefinition } from '../lib/index'

/**
 * Two wire formats of our own, added with `defineProtocol`: the plugin authenticates, checks
 * ownership, subscribes, conflates and applies the limits; a protocol only reads client messages
 * and renders the one internal event. They show how to serve an existing client's dialect.
 */

/** Reads a text frame as a JSON object, or answers what is wrong with it. */
function readObject (text: string, usage: string): { message: Record<string, unknown> } | { invalid: ClientAction } {
  let message: unknown
  try {
    message = JSON.parse(text)
  } catch {
    return { invalid: { type: 'invalid', message: `Invalid JSON: ${usage}` } }
  }
  if (message === null || typeof message !== 'object' || Array.isArray(message)) return { invalid: { type: 'invalid', message: `Messages must be JSON objects: ${usage}` } }
  return { message: message as Record<string, unknown> }
}

const name = (value: unknown): string => (typeof value === 'string' ? value : JSON.stringify(value ?? null)).slice(0, 64)

// ---------------------------------------------------------------------------------------------
// Scan updates (seed 001): `{ type, run_uuid }` in, `{ type, run_uuid, data }` out.

/** Seed 001 knows `calculating` and `optimal`; a job that ends otherwise says so by name. */
const SCAN_STATUS = { processing: 'calculating', complete: 'optimal', failed: 'failed', cancelled: 'cancelled' } as const

export interface ScanStatusData {
  /** Percent done, 0-100 (one decimal); 100 once `optimal`. */
  progression: number
  /** The same value, under the seed's other name. */
  currentProgress: number
  status: 'calculating' | 'optimal' | 'failed' | 'cancelled'
  processed: number
  total: number
  eta_seconds: number | null
  /** On `failed` and `cancelled`: why. */
  error?: string
  /** On `optimal`: where the result is (the example's result route). */
  result_url?: string
}

const SCAN_USAGE = 'send {"type": "subscribe" | "unsubscribe", "run_uuid": "<uuid>"}'

/**
 * Seed 001's dialect: one socket, any number of runs; `status_update` on every change; once every
 * subscribed run has ended the server closes with 1000. Results are not pushed: on `optimal` the
 * client fetches `data.result_url`.
 */
export function scanProtocol (opts: { path?: string } = {}): ProtocolDefinition {
  return defineProtocol({
    name: 'scan',
    path: opts.path ?? '/ws',
    closeOnFinal: true,
    parse (text) {
      const read = readObject(text, SCAN_USAGE)
      if ('invalid' in read) return read.invalid
      const { type, run_uuid: runUuid } = read.message
      if (type !== 'subscribe' && type !== 'unsubscribe') return { type: 'invalid', message: `Unknown message type: ${name(type)}; ${SCAN_USAGE}` }
      if (typeof runUuid !== 'string' || runUuid === '') return { type: 'invalid', message: `Missing run_uuid for ${type}` }
      return { type, jobId: runUuid }
    },
    render (event: JobEvent) {
      const p = progressMessage(event)
      const data: ScanStatusData = {
        progression: p.progress,
        currentProgress: p.progress,
        status: SCAN_STATUS[p.status],
        processed: p.processed,
        total: p.total,
        eta_seconds: p.eta_seconds
      }
      if (p.error !== undefined) data.error = p.error
      // The example's kinds keep the default basePath `/<kind>`.
      if (p.status === 'complete') data.result_url = `/${event.kind}/${event.jobId}/result`
      return { type: 'status_update', run_uuid: event.jobId, data }
    },
    subscribed: (jobId) => ({ type: 'subscribed', run_uuid: jobId, data: { message: 'Subscribed to scan updates' } }),
    unsubscribed: (jobId) => ({ type: 'unsubscribed', run_uuid: jobId, data: { message: 'Unsubscribed from scan updates' } }),
    error: (message, jobId) => ({ type: 'error', ...(jobId !== undefined ? { run_uuid: jobId } : {}), data: { message } })
  })
}

// ---------------------------------------------------------------------------------------------
// Token socket (seed 003): `{ "token" }` first, then `{ state, data }` both ways.

const STATE_USAGE = 'send {"state": "subscribe" | "unsubscribe", "data": {"job_id": "<uuid>"}} or {"state": "ping"}'

/**
 * Seed 003's session socket: the first frame is `{ "token": "<API key>" }` (browsers cannot set
 * headers on a socket); then `{ state, data }` requests. Progress comes as
 * `{ state: "progress", data: <the progress socket's message> }`. The socket stays open until the
 * client closes it.
 */
export function tokenSocketProtocol (opts: { path?: string } = {}): ProtocolDefinition {
  return defineProtocol({
    name: 'token-socket',
    path: opts.path ?? '/api/v1/socket',
    auth: 'first-message',
    parse (text) {
      const read = readObject(text, STATE_USAGE)
      if ('invalid' in read) return read.invalid
      const { state, data } = read.message
      switch (state) {
        case 'subscribe':
        case 'unsubscribe': {
          const jobId = data !== null && typeof data === 'object' ? (data as Record<string, unknown>).job_id : undefined
          if (typeof jobId !== 'string' || jobId === '') return { type: 'invalid', message: `Missing data.job_id for ${state}` }
          return { type: state, jobId }
        }
        case 'ping':
          return { type: 'ping' }
        default:
          return { type: 'invalid', message: `Unknown state: ${name(state)}; ${STATE_USAGE}` }
      }
    },
    render: (event) => ({ state: 'progress', data: progressMessage(event) }),
    connected: () => ({ state: 'initialised', data: {} }),
    authFailed: (reason) => ({ state: 'error', error: reason }),
    subscribed: (jobId) => ({ state: 'subscribed', data: { job_id: jobId } }),
    unsubscribed: (jobId) => ({ state: 'unsubscribed', data: { job_id: jobId } }),
    error: (message, jobId) => ({ state: 'error', error: message, ...(jobId !== undefined ? { data: { job_id: jobId } } : {}) }),
    pong: () => ({ state: 'pong', data: {} })
  })
}
