import type { Cluster, Redis } from 'ioredis'
import { isCluster } from '../core/redis-client'
import type { Broker, ScriptRelay } from './broker'
import { classicScriptRelay, RedisBroker } from './classic'
import { shardedScriptRelay, ShardedBroker } from './sharded'

/** The pub/sub topology: `classic` (PUBLISH/SUBSCRIBE) or `sharded` (SPUBLISH/SSUBSCRIBE). */
export type Topology = 'classic' | 'sharded'

/** The topology of a connection: sharded pub/sub on a cluster, classic otherwise, unless `kind` says which. */
function topologyOf (redis: Redis | Cluster, kind?: Topology): Topology {
  return kind ?? (isCluster(redis) ? 'sharded' : 'classic')
}

/**
 * The broker for a connection: sharded pub/sub on a cluster, classic otherwise, unless `kind`
 * says which. The subscriber connection is the one the broker reads with.
 */
export function createBroker (commands: Redis | Cluster, subscriber: Redis | Cluster, kind?: Topology): Broker {
  if (topologyOf(commands, kind) === 'sharded') return new ShardedBroker(commands as Cluster, subscriber as Cluster)
  return new RedisBroker(commands as Redis, subscriber as Redis)
}

/**
 * How a script run on `redis` relays a message on a job's channel, for the worker helper, which
 * has no broker: sharded pub/sub on a cluster, classic otherwise, unless `kind` says which.
 */
export function scriptRelay (redis: Redis | Cluster, kind?: Topology): ScriptRelay {
  return topologyOf(redis, kind) === 'sharded' ? shardedScriptRelay : classicScriptRelay
}
