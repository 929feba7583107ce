import type { Authenticator } from '../core/access'
import type { LogsRequest } from '../channels/logs/live-logs'
import type { StreamsRequest } from '../channels/streams/live-streams'
import type { ConnectionLimit } from './connection-limit'
import type { InboundOptions } from './inbound'
import type { MineContext } from './mine-feed'
import type { JobsContext } from './session-jobs'
import type { SessionRegistry } from './session-set'

/** What every session of one plugin instance shares (what its jobs read is in {@link JobsContext}). */
export interface SessionContext extends JobsContext {
  owners: Authenticator
  /** Where sessions register themselves: the instance's SessionSet (lib/session/timers.ts). */
  sessions: SessionRegistry<object>
  /** Connections per owner, counted across every instance. */
  connectionLimit: ConnectionLimit
  maxConnectionsPerOwner: number
  maxPayload: number
  firstMessageTimeoutMs: number
  /** What a connection's own messages may make the server do (`inbound` option). */
  inbound: InboundOptions
  mine?: MineContext
}

/** A job a session starts with (named by the route, not by a client message). */
export interface InitialJob { kind?: string, jobId: string, logs?: LogsRequest, streams?: StreamsRequest }
