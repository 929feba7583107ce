import type { Cluster, Redis } from 'ioredis'
import { RedisBroker } from './classic'
import { ShardedBroker } from './sharded'

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

/** Whether a connection is an ioredis Cluster. */
export function isCluster (redis: Redis | Cluster): redis is Cluster {
  return (redis as Cluster).isCluster === true
}

/**
 * The broker for a connection: sharded pub/sub on a cluster, classic otherwise, unless `kind`
 * says which. The subscriber connection is the one the broker reads with.
 */
export function createBroker (commands: Redis | Cluster, subscriber: Redis | Cluster, kind?: 'classic' | 'sharded'): Broker {
  const sharded = kind === 'sharded' || (kind === undefined && isCluster(commands))
  if (sharded) return new ShardedBroker(commands as Cluster, subscriber as Cluster)
  return new RedisBroker(commands as Redis, subscriber as Redis)
}
