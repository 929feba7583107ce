import type { Redis } from 'ioredis'
import { createHash } from 'node:crypto'
import { QuotaExceededError } from '../../errors'
import type { Keys } from '../../core/keys'

/** Per-owner limits of one kind (`quotas` option). */
export interface QuotaOptions {
  /** Jobs of one owner not yet ended (queued, delayed or active); 0: no limit. @default 0 */
  maxActiveJobs: number
  /** Jobs one owner may create per `windowMs` (uploads and JSON creates alike); 0: no limit. @default 0 */
  maxJobsPerWindow: number
  /** The window of `maxJobsPerWindow`, in ms. @default 60_000 */
  windowMs: number
  /** `Retry-After` when the active-jobs limit refuses (its end cannot be known), in seconds. @default 5 */
  activeRetryAfterSeconds: number
}

/**
 * One script decides a job's admission against both limits, so instances racing for an owner's
 * last slot cannot both win. The active set holds the owner's job ids scored by when they were
 * admitted; it is pruned here, not by a timer: a job whose hash has a `finishedOn` (or is gone,
 * once past the grace a just-admitted job needs to be added) no longer counts. The set never
 * holds more than the limit, so the pruning costs O(limit) per admission and nothing otherwise.
 *
 * KEYS: active set, window counter. ARGV: job key prefix, now, max active, grace ms, job id,
 * max per window, window ms, retry-after for the active limit (s), "1" to only check.
 * Returns 0 when admitted, else the seconds to wait, negated for the active limit.
 */
const SCRIPT = `
local rcall = redis.call
local now = tonumber(ARGV[2])
local maxActive = tonumber(ARGV[3])
local maxWindow = tonumber(ARGV[6])
if maxWindow > 0 then
  local used = tonumber(rcall("GET", KEYS[2]) or "0")
  if used >= maxWindow then
    local ttl = rcall("PTTL", KEYS[2])
    if ttl < 0 then ttl = tonumber(ARGV[7]) end
    return math.max(1, math.ceil(ttl / 1000))
  end
end
if maxActive > 0 then
  local members = rcall("ZRANGE", KEYS[1], 0, -1, "WITHSCORES")
  local count = 0
  for i = 1, #members, 2 do
    local id = members[i]
    local key = ARGV[1] .. id
    local live
    if rcall("EXISTS", key) == 1 then
      live = not rcall("HGET", key, "finishedOn")
    else
      live = tonumber(members[i + 1]) > now - tonumber(ARGV[4])
    end
    if live then count = count + 1 else rcall("ZREM", KEYS[1], id) end
  end
  if count >= maxActive then return -tonumber(ARGV[8]) end
  if ARGV[9] == "1" then return 0 end
  rcall("ZADD", KEYS[1], now, ARGV[5])
  rcall("PEXPIRE", KEYS[1], 7 * 24 * 3600 * 1000)
end
if maxWindow > 0 and ARGV[9] ~= "1" then
  if rcall("INCR", KEYS[2]) == 1 then rcall("PEXPIRE", KEYS[2], ARGV[7]) end
end
return 0
`

/** Decrements a window counter that still exists and is above 0 (KEYS: window counter). */
const GIVE_BACK = `
local n = tonumber(redis.call("GET", KEYS[1]) or "0")
if n > 0 then return redis.call("DECR", KEYS[1]) end
return 0
`

/** How long an admitted job may take to appear in Redis before its slot is taken back. */
const ADD_GRACE_MS = 60_000

export class Quotas {
  readonly #redis: Redis
  readonly #keys: Keys
  readonly #opts: QuotaOptions

  constructor (redis: Redis, keys: Keys, opts: QuotaOptions) {
    this.#redis = redis
    this.#keys = keys
    this.#opts = opts
  }

  get enabled (): boolean {
    return this.#opts.maxActiveJobs > 0 || this.#opts.maxJobsPerWindow > 0
  }

  #names (queue: string, owner: string): [string, string] {
    const id = createHash('sha256').update(owner).digest('hex').slice(0, 32)
    const { active, window } = this.#keys.quota(queue, id)
    return [active, window]
  }

  /** Takes a slot for `jobId`, or throws {@link QuotaExceededError} (429, with `retryAfter`). */
  async admit (queue: string, owner: string, jobId: string): Promise<void> {
    await this.#run(queue, owner, jobId, false)
  }

  /**
   * Throws as {@link admit} would, taking nothing: an upload is refused before its body is read
   * when its owner is already at a limit. The admission itself still decides atomically.
   */
  async check (queue: string, owner: string): Promise<void> {
    await this.#run(queue, owner, '', true)
  }

  async #run (queue: string, owner: string, jobId: string, dryRun: boolean): Promise<void> {
    if (!this.enabled) return
    const o = this.#opts
    const reply = await this.#redis.eval(SCRIPT, 2, ...this.#names(queue, owner),
      this.#keys.job(queue, ''), Date.now(), o.maxActiveJobs, ADD_GRACE_MS, jobId, o.maxJobsPerWindow, o.windowMs, o.activeRetryAfterSeconds, dryRun ? '1' : '0') as number
    if (reply === 0) return
    const err = reply < 0
      ? new QuotaExceededError(`at most ${o.maxActiveJobs} unfinished jobs per owner`)
      : new QuotaExceededError(`at most ${o.maxJobsPerWindow} jobs per ${o.windowMs} ms per owner`)
    ;(err as Error & { retryAfter?: number }).retryAfter = Math.abs(reply)
    throw err
  }

  /**
   * Gives back what {@link admit} took for a job that could not be added: its active slot and
   * its count in the window (never below 0; a window that ended meanwhile is left alone).
   */
  async release (queue: string, owner: string, jobId: string): Promise<void> {
    const [active, window] = this.#names(queue, owner)
    if (this.#opts.maxActiveJobs > 0) await this.#redis.zrem(active, jobId)
    if (this.#opts.maxJobsPerWindow > 0) await this.#redis.eval(GIVE_BACK, 1, window)
  }
}
