import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import type { Keys } from '../../core/keys'
import { writerTag, type Storage } from '../../core/storage'

/**
 * At start, removes the partial files that an earlier run of this instance left behind (killed
 * mid-upload): they carry its `instanceId`, and no upload of that id can be running while it
 * starts. Others' partial files wait for the sweep (`files.orphanAgeMs`): their writer may still
 * be sending. With a random `instanceId` (the default) no earlier run has this one's id.
 */
export async function removeOwnPartials (storage: Storage, writer: string, log: FastifyBaseLogger): Promise<number> {
  if (storage.list === undefined) return 0
  const tag = writerTag(writer)
  let removed = 0
  try {
    for await (const entry of storage.list()) {
      if (!entry.partial || (entry.writer !== tag && entry.writer !== writer)) continue
      await storage.remove(entry.key)
      removed++
    }
  } catch (err) {
    log.warn({ err }, 'job-progress: cannot remove the partial files of an earlier run; the sweep will')
  }
  if (removed > 0) log.info({ removed }, 'job-progress: removed partial uploads an earlier run of this instance left behind')
  return removed
}

export interface LostUploadsOptions {
  redis: Redis
  keys: Keys
  storage: Storage
  /** Releases a marked upload as its job's end would (keeps `files.retentionMs`). */
  release: (queue: string, jobId: string) => Promise<void>
  log: FastifyBaseLogger
}

/**
 * Uploads of jobs found lost (gone without an end: Redis came back empty, a failover lost them)
 * are removed when the loss is found, not an `orphanAgeMs` later. A job whose upload marker
 * survived is released through it; without its marker (lost with the job) the stored files of
 * that job are looked up in one pass over the storage, however many jobs were lost at once.
 */
export class LostUploads {
  readonly #o: LostUploadsOptions
  readonly #pending = new Map<string, string>()
  #running: Promise<void> | null = null

  constructor (opts: LostUploadsOptions) {
    this.#o = opts
  }

  /** A job found lost; its upload is removed in the background. */
  lost (queue: string, jobId: string): void {
    this.#pending.set(jobId, queue)
    this.#running ??= this.#drain().finally(() => { this.#running = null })
  }

  /** Resolves once every loss told so far was handled. */
  async settled (): Promise<void> {
    while (this.#running !== null) await this.#running
  }

  async #drain (): Promise<void> {
    // Losses come in bursts (every watched job of an emptied Redis): gather them first.
    await new Promise(resolve => setImmediate(resolve))
    while (this.#pending.size > 0) {
      const batch = new Map(this.#pending)
      this.#pending.clear()
      try {
        await this.#handle(batch)
      } catch (err) {
        this.#o.log.warn({ err }, 'job-progress: cannot remove the uploads of lost jobs; the sweep will')
      }
    }
  }

  async #handle (batch: Map<string, string>): Promise<void> {
    const { redis, keys, storage } = this.#o
    const unmarked = new Set<string>()
    for (const [jobId, queue] of batch) {
      if (await redis.exists(keys.upload(queue, jobId)) === 1) await this.#o.release(queue, jobId)
      else unmarked.add(jobId)
    }
    if (unmarked.size === 0 || storage.list === undefined) return
    for await (const entry of storage.list()) {
      // Partial files are their writer's until it ends (or the sweep finds them old).
      if (entry.partial || entry.jobId === undefined || !unmarked.has(entry.jobId)) continue
      this.#o.log.info({ key: entry.key }, 'job-progress: removing a file of a lost job')
      await storage.remove(entry.key)
    }
  }
}
