/**
 * The one seam every part reports through: counters and histograms are named once, here, and a
 * backend (Prometheus in `lib/core/metrics.ts`, or the user's own) decides where they go. Hot paths
 * call these methods instead of logging; the default does nothing and costs a call.
 */

/** Every metric the plugin reports, with its help text and label names. */
export const METRICS = {
  socketsOpen: { type: 'gauge', help: 'Open sockets, by protocol', labels: ['protocol'] },
  watchedJobs: { type: 'gauge', help: 'Jobs watched by at least one local socket', labels: [] },
  eventsRelayed: { type: 'counter', help: 'Job events this instance delivered to its watchers', labels: [] },
  relayLatency: { type: 'histogram', help: 'Seconds from the BullMQ event to its delivery to local sockets', labels: [] },
  bridgeLag: { type: 'gauge', help: 'Events in the queue event stream not yet delivered to the bridge group', labels: ['queue'] },
  bridgePublished: { type: 'counter', help: 'Stream events the bridge published', labels: [] },
  gapsRepaired: { type: 'counter', help: 'Watched jobs whose state a fault re-read changed', labels: ['cause'] },
  faults: { type: 'counter', help: 'Faults that can lose events, detected', labels: ['cause'] },
  snapshotReads: { type: 'counter', help: 'Job snapshots read from Redis', labels: ['reason'] },
  redisCommands: { type: 'counter', help: 'Redis commands issued by the plugin', labels: ['op'] },
  slowClientsClosed: { type: 'counter', help: 'Sockets closed because they did not read their messages', labels: [] },
  uploads: { type: 'counter', help: 'Uploads, by outcome and reason', labels: ['outcome', 'reason'] },
  finalsRecovered: { type: 'counter', help: 'Final states lost to a stream gap and recovered for the lifecycle listeners', labels: ['queue', 'state'] },
  finalsGone: { type: 'counter', help: 'Jobs created in a stream gap whose final was lost and that BullMQ had already removed', labels: ['queue'] }
} as const

export type MetricName = keyof typeof METRICS
export type Labels = Record<string, string>

export interface Telemetry {
  /** Adds `n` (default 1) to a counter. */
  count: (name: MetricName, labels?: Labels, n?: number) => void
  /** Records one value of a histogram. */
  observe: (name: MetricName, value: number, labels?: Labels) => void
  /** Registers how to read a gauge when it is collected (no work between scrapes). */
  gauge: (name: MetricName, read: () => number | Array<[Labels, number]>) => void
}

/** Reports nowhere: the default when no metrics are asked for. */
export const noTelemetry: Telemetry = {
  count () {},
  observe () {},
  gauge () {}
}
