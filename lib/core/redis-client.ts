import type { Cluster, Redis } from 'ioredis'

/**
 * Whether a connection is an ioredis Cluster: a cluster runs one pipeline per slot, so the core's
 * reads group their commands by slot on it.
 */
export function isCluster (redis: Redis | Cluster): redis is Cluster {
  return (redis as Cluster).isCluster === true
}
