import type { Keys } from '../../core/keys'
import { jobUpdate } from '../../protocols/jobs'
import { readSnapshots, type Commands } from '../../core/snapshot'
import type { JobStatus } from '../../wire/messages'

export interface OwnerIndexOptions {
  /** Jobs kept per owner and queue; the oldest leave the index. */
  maxPerOwner: number
  /** The index of an owner expires after this long without a new job. */
  ttlSeconds: number
}

/** One job of a "my jobs" page. */
export interface ListedJob {
  job_id: string
  kind: string
  status: JobStatus
  progress: number
  processed: number
  total: number
  eta_seconds: number | null
  error: string | null
  /** When it was created, milliseconds since the epoch. */
  created_at: number
  stage?: string
  message?: string
}

/** Where a page ended: the last job's creation time and id (newest first, ties by id). */
export interface Cursor { score: number, id: string }

export function encodeCursor (c: Cursor): string {
  return Buffer.from(`${c.score}:${c.id}`).toString('base64url')
}

/** Null for anything that is not a cursor this module made. */
export function decodeCursor (raw: string): Cursor | null {
  const text = Buffer.from(raw, 'base64url').toString()
  const colon = text.indexOf(':')
  const score = Number(text.slice(0, colon))
  const id = text.slice(colon + 1)
  if (colon < 1 || !Number.isSafeInteger(score) || id === '' || id.length > 64) return null
  return { score, id }
}

/** Rounds of reads one page may take when filters skip most entries; the cursor goes on from there. */
const ROUNDS = 5

/** Whether entry (score, id) comes after the cursor in newest-first order. */
const after = (c: Cursor | null, score: number, id: string): boolean => c === null || score < c.score || (score === c.score && id < c.id)

/**
 * Each owner's jobs, per queue: a sorted set `<prefix>:<queue>:jp:owner:<owner>` of job ids scored
 * by creation time, in the queue's namespace (so in its cluster slot). Written once per job when
 * it is created and trimmed to `maxPerOwner` there. BullMQ removes jobs without telling anyone
 * (`removeOnComplete`, `clean`): a listed id whose job is gone is skipped when read and removed
 * from the index then, so the index never needs a scan of the queue.
 */
export class OwnerIndex {
  readonly #redis: Commands
  readonly #keys: Keys
  readonly #o: OwnerIndexOptions
  /** Entries removed because their job was gone (for tests and metrics). */
  pruned = 0

  constructor (redis: Commands, keys: Keys, opts: OwnerIndexOptions) {
    this.#redis = redis
    this.#keys = keys
    this.#o = opts
  }

  key (queue: string, owner: string): string {
    return this.#keys.ownerIndex(queue, owner)
  }

  /** Records a new job: three commands in one round trip, all on the owner's key. */
  async add (queue: string, jobId: string, owner: string, at = Date.now()): Promise<void> {
    const key = this.key(queue, owner)
    await this.#redis.pipeline()
      .zadd(key, at, jobId)
      .zremrangebyrank(key, 0, -(this.#o.maxPerOwner + 1))
      .expire(key, this.#o.ttlSeconds)
      .exec()
  }

  /**
   * A page of the owner's jobs in `queues` (kind and queue), newest first, from after `cursor`,
   * with only the `states` given (all when empty). `next` is null once nothing older is left.
   */
  async list (owner: string, queues: Array<{ kind: string, queue: string }>, states: Set<string>, limit: number, cursor: Cursor | null): Promise<{ jobs: ListedJob[], next: Cursor | null }> {
    const jobs: ListedJob[] = []
    let pos = cursor
    const batch = Math.min(200, states.size === 0 ? limit + 1 : limit * 2 + 8)
    for (let round = 0; round < ROUNDS; round++) {
      // The next `batch` entries of every queue after the cursor, merged newest first.
      const fetched = await Promise.all(queues.map(async ({ kind, queue }) => {
        const key = this.key(queue, owner)
        // Entries sharing the cursor's score are fetched again and skipped: ask for that many more.
        const ties = pos === null ? 0 : await this.#redis.zcount(key, pos.score, pos.score)
        const raw = await this.#redis.zrevrangebyscore(key, pos === null ? '+inf' : pos.score, '-inf', 'WITHSCORES', 'LIMIT', 0, batch + ties)
        const out: Array<{ kind: string, queue: string, id: string, score: number }> = []
        for (let i = 0; i < raw.length; i += 2) {
          const score = Number(raw[i + 1])
          if (after(pos, score, raw[i])) out.push({ kind, queue, id: raw[i], score })
        }
        return { out, more: raw.length >= batch + ties }
      }))
      const candidates = fetched.flatMap(f => f.out).sort((a, b) => b.score - a.score || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0)).slice(0, batch)
      if (candidates.length === 0) return { jobs, next: null }
      // Read in one pipelined round trip per queue (one slot each on a cluster).
      const byQueue = new Map<string, typeof candidates>()
      for (const c of candidates) byQueue.set(c.queue, [...(byQueue.get(c.queue) ?? []), c])
      const snapshots = new Map<string, Awaited<ReturnType<typeof readSnapshots>>[number]>()
      await Promise.all([...byQueue].map(async ([queue, list]) => {
        const read = await readSnapshots(this.#redis, this.#keys, list.map(c => ({ kind: c.kind, queue, jobId: c.id })), false)
        list.forEach((c, i) => snapshots.set(c.id, read[i]))
        const gone = list.filter((_c, i) => read[i] === null || read[i]?.owner !== owner).map(c => c.id)
        if (gone.length > 0) {
          this.pruned += gone.length
          await this.#redis.zrem(this.key(queue, owner), ...gone)
        }
      }))
      for (const c of candidates) {
        pos = { score: c.score, id: c.id }
        const snapshot = snapshots.get(c.id)
        if (snapshot === null || snapshot === undefined || snapshot.owner !== owner) continue
        const u = jobUpdate(snapshot.event)
        if (states.size > 0 && !states.has(u.status)) continue
        jobs.push({
          job_id: c.id,
          kind: c.kind,
          status: u.status,
          progress: u.progress,
          processed: u.processed,
          total: u.total,
          eta_seconds: u.eta_seconds,
          error: u.error,
          created_at: c.score,
          ...(u.stage !== undefined ? { stage: u.stage } : {}),
          ...(u.message !== undefined ? { message: u.message } : {})
        })
        if (jobs.length === limit) {
          const more = fetched.some(f => f.more) || candidates[candidates.length - 1] !== c
          return { jobs, next: more ? pos : null }
        }
      }
      if (!fetched.some(f => f.more) && candidates.length < batch) return { jobs, next: null }
    }
    return { jobs, next: pos }
  }
}
