import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import type { Readable } from 'node:stream'
import type { BridgeEvent } from '../../bridge/bridge'
import { QueueUnavailableError } from '../../errors'
import type { Keys } from '../../core/keys'
import type { Storage, StoredFileInfo } from '../../core/storage'

export interface UploadCleanupOptions {
  /** Plain command connection. */
  redis: Redis
  keys: Keys
  storage: Storage
  /** Queue name of each kind. */
  queueOf: (kind: string) => string | undefined
  /** Every queue of the plugin (for the retention sweep). */
  queues: string[]
  /** Kept this long after the final state; 0: removed at once. */
  retentionMs: number
  /** `.part` files and files of unknown jobs older than this are removed by the sweep. */
  orphanAgeMs: number
  sweepIntervalMs: number
  log: FastifyBaseLogger
}

/** Output files are stored under the kind `<kind>.out.<name>` (lib/core/outputs.ts). */
const OUTPUT_INFIX = '.out.'

/** Due retentions removed per round trip of the sweep. */
const DUE_BATCH = 100

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
  #timer: NodeJS.Timeout | null = null
  #sweeping: Promise<void> | null = null
  #closed = false

  constructor (opts: UploadCleanupOptions) {
    this.#o = opts
  }

  /** Sweeps once now (in the background) and then every `sweepIntervalMs`. */
  start (): void {
    this.#sweepSoon()
    this.#timer = setInterval(() => this.#sweepSoon(), this.#o.sweepIntervalMs).unref()
  }

  async close (): Promise<void> {
    this.#closed = true
    if (this.#timer !== null) clearInterval(this.#timer)
    await this.#sweeping
  }

  #sweepSoon (): void {
    if (this.#sweeping !== null || this.#closed) return
    this.#sweeping = this.sweep()
      .catch((err: Error) => this.#o.log.warn({ err }, 'job-progress: upload sweep failed; will retry'))
      .finally(() => { this.#sweeping = null })
  }

  /** The queue's set of uploads kept for `retentionMs`, scored by when they are due. */
  #due (queue: string): string {
    return this.#o.keys.uploadsDue(queue)
  }

  /**
   * Removes uploads whose retention ended, then orphans: `.part` files and files whose job has no
   * marker (lost with Redis, an instance killed between storing and queueing) once older than
   * `orphanAgeMs`. A marked file whose job is gone or finished without its event having been
   * handled (a crash between the two) is released like a final event would.
   */
  async sweep (): Promise<void> {
    const { redis, storage, keys } = this.#o
    const now = Date.now()
    for (const queue of this.#o.queues) {
      for (;;) {
        const due = await redis.zrangebyscore(this.#due(queue), '-inf', now, 'LIMIT', 0, DUE_BATCH)
        for (const jobId of due) {
          await this.#remove(queue, jobId)
          await redis.zrem(this.#due(queue), jobId)
        }
        if (due.length < DUE_BATCH || this.#closed) break
      }
    }
    if (storage.list === undefined) return
    for await (const entry of storage.list()) {
      if (this.#closed) return
      if (now - entry.modifiedMs < this.#o.orphanAgeMs) continue
      if (entry.partial) {
        await storage.remove(entry.key)
        continue
      }
      if (entry.kind !== undefined && entry.jobId !== undefined && await this.#sweepOutput(entry.kind, entry.jobId, entry.key)) continue
      const queue = entry.kind === undefined ? undefined : this.#o.queueOf(entry.kind)
      if (queue === undefined || entry.jobId === undefined) continue
      const [[, key], [, finishedOn], [, exists]] = await redis.pipeline()
        .get(this.marker(queue, entry.jobId))
        .hget(keys.job(queue, entry.jobId), 'finishedOn')
        .exists(keys.job(queue, entry.jobId))
        .exec() as Array<[Error | null, unknown]>
      if (key === null) {
        this.#o.log.info({ key: entry.key }, 'job-progress: removing an upload whose job is unknown')
        await storage.remove(entry.key)
      } else if (exists === 0 || finishedOn !== null) {
        await this.release(queue, entry.jobId, finishedOn === null ? now : Number(finishedOn))
      }
    }
  }

  /**
   * An output file (stored under `<kind>.out.<name>`) outlives its job's end, to be downloaded;
   * once the job itself is gone (`removeOnComplete`, `clean`, lost with Redis) nobody can reach
   * it any more: it is removed with its entry. True when the entry was an output.
   */
  async #sweepOutput (storedKind: string, jobId: string, key: string): Promise<boolean> {
    const at = storedKind.indexOf(OUTPUT_INFIX)
    if (at < 0) return false
    const queue = this.#o.queueOf(storedKind.slice(0, at))
    if (queue === undefined) return true
    if (await this.#o.redis.exists(this.#o.keys.job(queue, jobId)) === 1) return true
    this.#o.log.info({ key }, 'job-progress: removing an output file whose job is gone')
    await this.#o.storage.remove(key)
    await this.#o.redis.del(this.#o.keys.outputs(queue, jobId))
    return true
  }

  /** The marker that holds a job's storage key until its upload is removed. */
  marker (queue: string, jobId: string): string {
    return this.#o.keys.upload(queue, jobId)
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

  /**
   * Bridge listener: a job's final event (or its removal) releases its upload. Awaited before the
   * stream entry is acknowledged: a removal that fails leaves the entry pending, so it is tried
   * again when the entry is claimed, not only by the sweep an hour later.
   */
  async onEvent (event: BridgeEvent): Promise<void> {
    if (!event.final && event.event !== 'removed') return
    await this.release(event.queue, event.jobId, event.t).catch((err: Error) => {
      this.#o.log.warn({ err, jobId: event.jobId }, 'job-progress: cannot remove an upload yet; its event is read again')
      throw err
    })
  }

  /**
   * A job ended at `endedAt`: its upload goes now, or is scheduled for the end of its retention.
   * Idempotent (the bridge is at-least-once): a second release keeps the first due time.
   */
  async release (queue: string, jobId: string, endedAt: number): Promise<void> {
    const due = endedAt + this.#o.retentionMs
    if (this.#o.retentionMs === 0 || due <= Date.now()) await this.#remove(queue, jobId)
    else await this.#o.redis.zadd(this.#due(queue), 'NX', due, jobId)
  }

  /** Removes the upload first, then its marker: a crash between the two leaves it to the sweep. */
  async #remove (queue: string, jobId: string): Promise<void> {
    const { redis, storage } = this.#o
    const marker = this.marker(queue, jobId)
    const key = await redis.get(marker)
    if (key === null) return
    await storage.remove(key)
    await redis.del(marker)
  }
}
