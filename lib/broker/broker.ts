import type { Cluster, Redis } from 'ioredis'

/**
 * The pub/sub a hub reads from and a bridge writes to. Classic Redis pub/sub and Redis Cluster's
 * sharded pub/sub sit behind it, so a new topology is a new file here and nothing else changes.
 */
export interface Broker {
  /** `classic` (PUBLISH/SUBSCRIBE) or `sharded` (SPUBLISH/SSUBSCRIBE). */
  readonly kind: 'classic' | 'sharded'
  /** Subscribes channels; resolves once Redis confirmed them, so a read after it misses nothing. */
  /**
   * Subscribes; `again` sends the subscription even for channels subscribed already (after a
   * reconnect, to know it is in effect), else those cost one round trip and nothing more.
   */
  subscribe: (channels: string[], again?: boolean) => Promise<void>
  unsubscribe: (channels: string[]) => Promise<void>
  /** Registers the receiver of every message. */
  onMessage: (receive: (channel: string, message: string) => void) => void
  /**
   * Registers what to do after the subscriptions were lost and made again (a reconnect, a
   * failover, a slot that moved): messages published meanwhile are gone.
   */
  onRecover: (recover: () => void) => void
  /** Whether subscribing can start within `ms` (waits for a reconnect in progress). */
  ready: (ms: number) => Promise<boolean>
  /** Publishes messages; resolves once Redis took them all. */
  publish: (messages: Array<[channel: string, payload: string]>) => Promise<void>
  /** Lists the channels matching a glob that somebody subscribes to now (for a resync after a fault). */
  channels: (pattern: string) => Promise<string[]>
  /**
   * Whether a PUBLISH sent on any connection to this Redis reaches every subscriber (classic),
   * so a script, or a read's own connection, may publish in the same round trip. Not so with
   * sharded pub/sub: a message must go to the shard of its channel's slot.
   */
  readonly publishesAnywhere: boolean
  /**
   * The group of keys that one command may span: the key's cluster slot with sharded pub/sub on
   * a cluster, a single group (0) otherwise.
   */
  keyGroup: (key: string) => number
}

/**
 * How a script that writes next to a job also relays a message on the job's channel. Classic
 * pub/sub publishes inside the script (one round trip, and only once the write is done); sharded
 * pub/sub cannot (the channel is hashed on the job id, in another slot than the job's keys), so
 * the message is SPUBLISHed right after the script.
 */
export interface ScriptRelay {
  /** Whether the script itself PUBLISHes the message. */
  readonly inScript: boolean
  /** Publishes the message after the script, when the script could not. */
  after: (redis: Redis | Cluster, channel: string, message: string) => Promise<void>
}

/**
 * Runs a pipeline and fails when any of its commands failed: ioredis resolves `exec()` with an
 * error per command, and a PUBLISH refused (a connection dropped, its offline queue off) must not
 * count as sent, or its stream entry would be acknowledged and the event lost.
 */
export async function execAll (pipe: { exec: () => Promise<Array<[Error | null, unknown]> | null> }): Promise<void> {
  const replies = await pipe.exec()
  if (replies === null) throw new Error('pipeline was not run (connection closed)')
  for (const [err] of replies) if (err !== null) throw err
}
