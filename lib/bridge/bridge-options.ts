import type { FastifyBaseLogger } from 'fastify'
import type { Broker } from '../broker/broker'
import type { Commands } from '../core/snapshot'
import type { Telemetry } from '../core/telemetry'
import type { Keys } from '../core/keys'
import type { BridgeEvent } from './bridge-event'

export interface BridgeOptions {
  /** Commands: PUBLISH, XACK, XAUTOCLAIM. */
  redis: Commands
  /** A dedicated connection for the blocking XREADGROUP. */
  blocking: Commands
  /** Where to publish; PUBLISH on `redis` when absent. */
  broker?: Broker
  keys: Keys
  queues: string[]
  group: string
  consumer: string
  blockMs: number
  claimIdleMs: number
  claimIntervalMs: number
  /** A consumer with nothing pending and idle this long is a dead instance's leftover. */
  consumerIdleMs: number
  /**
   * Reads and publishes in one script on Redis (lib/bridge/relay-script.ts), so that every job's messages
   * leave Redis in stream order whatever the number of instances; only on one Redis with classic
   * pub/sub (a cluster's channels live on other shards than the stream). @default true
   */
  ordered?: boolean
  /** Also hands each message this instance publishes from Node to its own subscribers. */
  local?: (channel: string, payload: string) => void
  /**
   * Whether `onEvent` listeners want progress events too; when false the ordered relay
   * acknowledges progress entries in its script and hands back only lifecycle events.
   * @default true
   */
  progressListeners?: boolean
  /**
   * Called with every relayed event once its message was sent, and before its entry is
   * acknowledged (once across the cluster in normal operation, again after a takeover: be
   * idempotent on the entry id). The bridge waits for a returned promise, so keep it short, and
   * return nothing when there is nothing to wait for; errors are logged.
   */
  onEvent?: (event: BridgeEvent) => void | Promise<void>
  /**
   * How far back the records of cancels and creations reach (the cancel mark's lifetime): a gap
   * whose start no instance recorded (Redis came back empty) is looked for this far back.
   */
  recordRetentionMs?: number
  telemetry?: Telemetry
  log: FastifyBaseLogger
}
