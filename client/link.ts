/**
 * What a transport (client/websocket.ts, client/sse.ts, client/polling.ts) and the connection
 * (client/index.ts) share: how a connection looks to its transport, what every connection of a
 * client shares, and how a message or a close code is read.
 *
 * Internal names end with `_`: the build shortens them (scripts/build-client.mjs).
 */
import { shouldRetry } from '../lib/wire/close-codes'
import type { JobUpdateMessage } from '../lib/wire/messages'
import { AuthError, ConnectionError } from './errors'
import type { MyJobs } from './my-jobs'
import type { Watch } from './watch'

/** JSON text to a value; null when it is not JSON. */
export const parse = (text: string): any => {
  try { return JSON.parse(text) } catch { return null }
}

export const authError = (reason?: string): AuthError => new AuthError(reason || 'authentication required')

/** What a close code means for the client: null to reconnect, else the error that ends the connection's watches. */
export const closeError = (code: number, reason: string): Error | null =>
  code === 4001 ? authError(reason) : shouldRetry(code) || code === 1000 ? null : new ConnectionError(code, reason)

/** What every connection of a client shares: where and how to connect, and what is watched. */
export interface Env {
  base_: string
  key_?: string
  via_: 'subprotocol' | 'query' | 'first-message'
  Ws_?: typeof WebSocket
  wsPath_: string
  ssePath_: string
  /** The caller's jobs route; its feed is `<mine_>/events`. */
  mine_: string
  headers_: Record<string, string>
  pollMs_: number
  request_: (url: URL, init?: RequestInit) => Promise<Response>
  route_: (name: 'status' | 'result', kind: string, jobId: string) => URL
  watches_: Map<string, Watch>
  feeds_: Set<MyJobs>
  active_: () => Watch[]
  /** The SSE `Last-Event-ID` to resume from: the newest state held. */
  last_?: string
  /** A job's state, in the `jobs` protocol's words. */
  update_: (m: JobUpdateMessage) => void
}

/** One connection, as its transport sees it. */
export interface Link {
  /** The jobs it carries: job id to kind; `''` is the caller's jobs feed. */
  w_: Map<string, string>
  /** It ended (closed, or reported its end). */
  ended_: boolean
  /** It went live (the server said so). */
  up_: boolean
  live_: () => void
  /** It ended: null to reconnect, else the error that ends its watches. */
  end_: (error: Error | null) => void
  /** A message of the `jobs` protocol, or an SSE event (its `event:` as the type). */
  msg_: (type: string, m: any) => void
  touch_: () => void
  /** Set by the transport: a job added (or asking for more), removed; the connection closed. */
  add_: (jobId: string) => void
  rm_: (jobId: string) => void
  stop_: () => void
}

/** A connection, as the client holds it. */
export interface Conn extends Link {
  /** Carry this job too (`again`: it asks for more now, its log lines); `''` is the caller's jobs feed. */
  put_: (kind: string, jobId: string, again?: boolean) => void
  drop_: (jobId: string) => void
  /** Ends the connection without reporting it down. */
  shut_: () => void
}
