import type { JobEvent } from '../core/event'
import type { LogsRequest } from '../channels/logs/live-logs'
import type { StreamsRequest } from '../channels/streams/live-streams'
import type { StreamMessage } from '../wire/streams'
import type { LogMessage, MyJobMessage, MyJobsResyncMessage } from '../wire/messages'

/** What a client message asks for, once a protocol has parsed it. */
export type ClientAction =
  | { type: 'subscribe', jobId: unknown, logs?: LogsRequest, streams?: StreamsRequest }
  | { type: 'subscribe_mine' }
  | { type: 'unsubscribe_mine' }
  | { type: 'unsubscribe', jobId: unknown }
  | { type: 'ping' }
  | { type: 'ignore' }
  | { type: 'invalid', message: string }

/** A server message: an object is sent as JSON, a string as is; undefined sends nothing. */
export type ServerMessage = object | string | undefined

/**
 * A wire format over the one internal {@link JobEvent}: how client messages read and how server
 * messages look. The plugin drives the connection (auth, ownership, limits, slow clients); a
 * protocol only translates.
 */
export interface ProtocolDefinition {
  /** Name in logs and errors. */
  name: string
  /**
   * Route path. For a per-job protocol, the prefix: the plugin serves `<path>/<kind>/:jobId` for
   * every kind and subscribes the job in the path; for any other, the route itself.
   */
  path: string
  /** One job per socket, named in the path. @default false */
  perJob?: boolean
  /**
   * How clients authenticate. `request`: session cookie or API key on the upgrade request.
   * `first-message`: the first text frame must be `{ "token": "<API key>" }`, within
   * `firstMessageTimeoutMs`, for clients that can set neither headers nor query parameters; the
   * key is checked against `apiKeys` (without `apiKeys` no token is accepted). Frames sent right
   * after the token wait until it is checked. A bad token or none in time: `authFailed`, then
   * close 4001.
   * @default 'request'
   */
  auth?: 'request' | 'first-message'
  /** Close with 1000 once every job of the socket has reached a final state. @default false */
  closeOnFinal?: boolean
  /** Reads a text frame. @default every frame is ignored */
  parse?: (text: string) => ClientAction
  /** Renders a job event for a subscriber. */
  render: (event: JobEvent) => ServerMessage
  /** Sent once the client is authenticated. */
  connected?: () => ServerMessage
  /** Sent when authentication fails (either mode), just before the socket closes with 4001. */
  authFailed?: (reason: string) => ServerMessage
  /** Sent when a subscribe succeeds, just before the job's current state (a `render`). */
  subscribed?: (jobId: string) => ServerMessage
  /** Sent on every unsubscribe, whether or not the job was subscribed. */
  unsubscribed?: (jobId: string) => ServerMessage
  /**
   * Renders an error the connection survives (bad message, unknown or foreign job, subscription
   * limit); `jobId` is the job the message named, when it named one. Without it such errors
   * close the socket with 1008 and the message as the reason, so a client never waits on a
   * request that silently failed.
   */
  error?: (message: string, jobId?: string) => ServerMessage
  /** Sent every `heartbeatIntervalMs` to each authenticated socket. */
  heartbeat?: () => ServerMessage
  /**
   * Renders a log line or a `logs_truncated` marker for a subscription that asked for logs.
   * Without it a protocol's subscriptions get no log lines.
   */
  logs?: (message: LogMessage) => ServerMessage
  /**
   * Renders a stream chunk, `stream_end` or `stream_truncated` for a subscription that asked for
   * streams. Without it a protocol's subscriptions get no streams.
   */
  streams?: (message: StreamMessage) => ServerMessage
  /** Renders a message of the caller's jobs feed (`subscribe_mine`). Without it the feed is refused. */
  mine?: (message: MyJobMessage | MyJobsResyncMessage) => ServerMessage
  /** The answer to a `{ type: 'ping' }` action. */
  pong?: () => ServerMessage
}

/** Defines a protocol with its types checked; returns it unchanged. */
export function defineProtocol (protocol: ProtocolDefinition): ProtocolDefinition {
  return protocol
}
