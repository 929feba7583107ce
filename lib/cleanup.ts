import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import type { Readable } from 'node:stream'
import type { BridgeEvent } from './bridge'
import { QueueUnavailableError } from './errors'
import type { Keys } from './keys'
import type { Storage, StoredFileInfo } from './storage'

export interface UploadCleanupOptions {
  /** Plain command connection. */
  redis: Redis
  keys: Keys
  storage: Storage
  /** Queue name of each kind. */
  queueOf: (kind: string) => string | undefined
  log: FastifyBaseLogger
}

/** How long a write is remembered, so a failed upload's `remove()` also drops its marker. */
const IN_FLIGHT_MS = 10 * 60_000

/**
 * An upload outlives every attempt of its job: it is removed only once the job's final state is
 * recorded in Redis, as the bridge reads it from the queue's event stream (`completed`, `failed`,
 * `cancelled`, or `removed`), never on a worker's belief that its attempt was the last one (a
 * worker whose lock expired during a Redis pause still thinks it owns the job while a second
 * attempt reads the file).
 *
 * The job's data, and the storage key in it, can be gone when the final event is read
 * (`removeOnComplete`), so the key is kept in a small marker of its own, in the queue's key
 * space (one cluster slot with the job): `<prefix>:<queue>:jp:upload:<jobId>`.
 */
export class UploadCleanup {
  readonly #o: UploadCleanupOptions
  readonly #inFlight = new Map<string, { marker: string, at: number }>()

  constructor (opts: UploadCleanupOptions) {
    this.#o = opts
  }

  /** The marker that holds a job's storage key until its upload is removed. */
  marker (queue: string, jobId: string): string {
    return this.#o.keys.queueKey(queue, 'jp:upload:' + jobId)
  }

  /**
   * The storage the upload route writes through: each stored file gets its marker before the
   * job is added, so no final event can come before the marker.
   */
  tracked (): Storage {
    const { storage, redis } = this.#o
    const tracked: Storage = {
      write: async (source: Readable, info: StoredFileInfo) => {
        const stored = await storage.write(source, info)
        const queue = this.#o.queueOf(info.kind) ?? info.kind
        const marker = this.marker(queue, info.jobId)
        try {
          await redis.set(marker, stored.key)
        } catch (err) {
          await storage.remove(stored.key).catch(() => {})
          this.#o.log.warn({ err }, 'job-progress: cannot record an upload')
          throw new QueueUnavailableError()
        }
        const now = Date.now()
        for (const [key, entry] of this.#inFlight) {
          if (now - entry.at < IN_FLIGHT_MS) break
          this.#inFlight.delete(key)
        }
        this.#inFlight.set(stored.key, { marker, at: now })
        return stored
      },
      open: (key) => storage.open(key),
      remove: async (key) => {
        await storage.remove(key)
        const entry = this.#inFlight.get(key)
        if (entry !== undefined) {
          this.#inFlight.delete(key)
          await redis.del(entry.marker)
        }
      }
    }
    if (storage.localPath !== undefined) tracked.localPath = (key) => storage.localPath?.(key) as string
    return tracked
  }

  /** Bridge listener: a job's final event (or its removal) releases its upload. */
  onEvent (event: BridgeEvent): void {
    if (!event.final && event.event !== 'removed') return
    this.release(event.queue, event.jobId).catch((err: Error) => {
      // Left for the sweep, which finds the marker of a finished job again.
      this.#o.log.warn({ err, jobId: event.jobId }, 'job-progress: cannot remove an upload yet')
    })
  }

  /** Removes a finished job's upload, then its marker; idempotent (the bridge is at-least-once). */
  async release (queue: string, jobId: string): Promise<void> {
    const { redis, storage } = this.#o
    const marker = this.marker(queue, jobId)
    const key = await redis.get(marker)
    if (key === null) return
    await storage.remove(key)
    await redis.del(marker)
  }
}
