import type { Keys } from '../core/keys'
import type { Commands } from '../core/snapshot'
import { noTelemetry } from '../core/telemetry'
import type { BridgeEvent } from './bridge-event'
import type { BridgeOptions } from './bridge-options'
import type { Running } from './run-state'

type Options = Pick<BridgeOptions, 'redis' | 'keys' | 'consumer' | 'onEvent' | 'telemetry' | 'log' | 'recordRetentionMs'>

/**
 * `finishedOn` and the created record are written with the clock of a worker or an API instance,
 * entry ids with Redis's: a window of entry ids is widened by this much on each side before it
 * is looked up by those times. A wider window only costs finals handed over twice (listeners are
 * idempotent on their final), a narrower one could miss a final of a worker whose clock is off.
 */
export const CLOCK_PAD_MS = 60_000

/** Jobs read per page: one ZRANGEBYSCORE, then one pipeline of one read per job. */
export const PAGE = 100

/** How long a recovering instance holds a queue's windows without a page done; renewed per page. */
const LEASE_MS = 30_000

/** The parts of a window, in order: BullMQ's two sets of finished jobs, the cancels, the creations. */
const PHASES = ['completed', 'failed', 'cancelled', 'created'] as const
type Phase = typeof PHASES[number]

/** Where a window's recovery stands: the phase, and the position in its set (score, then rank within that score). */
interface Cursor { phase: number, score: number | null, skip: number, recovered: number, gone: number }

/**
 * KEYS[1]: the queue's gap record. ARGV: mode (`trim` or `restart`), the group's deficit now (-1
 * when Redis cannot count it), the entries trimmed from the stream so far, the group's last
 * delivered entry id, the upper end of the window (the stream's first entry, or its last id once
 * empty), the lower end when the record knows none. Returns [claimed (0/1), windows pending].
 *
 * `trim`: entries were lost when the deficit (entries trimmed that the group never read, Redis
 * 7's counters) grew since the record's; or, when the group's count is unknown (a group that has
 * read nothing yet, or after some trims), when more entries were trimmed while the group stands
 * before the stream's first entry. The entries lost lie after `seen`, the last entry the group
 * was known to have read with no loss before it, and before the upper end. The window is
 * recorded as a field `w:<from>:<to>`: one script, so among all instances checking at once
 * exactly one claims it. With no loss `seen` moves forward; a smaller count (the stream made
 * anew) starts over. `restart`: the group was made again (Redis came back without it):
 * everything after `seen` may be lost.
 */
const CLAIM_SCRIPT = `
local function newer (a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  am, bm = tonumber(am), tonumber(bm)
  return am > bm or (am == bm and tonumber(as) > tonumber(bs))
end
local record = redis.call('HMGET', KEYS[1], 'deficit', 'trimmed', 'seen')
local deficit, trimmed = tonumber(ARGV[2]), tonumber(ARGV[3])
local seen = record[3] or ARGV[6]
local claimed = 0
if ARGV[1] == 'restart' then
  claimed = 1
elseif record[2] then
  if deficit >= 0 and record[1] and tonumber(record[1]) >= 0 then
    claimed = deficit > tonumber(record[1]) and 1 or 0
  else
    claimed = (trimmed > tonumber(record[2]) and newer(ARGV[5], ARGV[4])) and 1 or 0
  end
end
if claimed == 1 then
  redis.call('HSET', KEYS[1], 'w:' .. seen .. ':' .. ARGV[5], '', 'seen', ARGV[4])
elseif not record[3] or newer(ARGV[4], record[3]) then
  redis.call('HSET', KEYS[1], 'seen', ARGV[4])
end
redis.call('HSET', KEYS[1], 'deficit', deficit, 'trimmed', trimmed)
return { claimed, redis.call('HLEN', KEYS[1]) - 3 }
`

/** KEYS[1]: a lease. ARGV: its holder, milliseconds. Renews it only for its holder. */
const RENEW_SCRIPT = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`

/** KEYS[1]: a lease. ARGV: its holder. Lets it go only for its holder. */
const RELEASE_SCRIPT = `
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`

type WithGapScripts = Commands & {
  jpGapClaim: (key: string, ...args: string[]) => Promise<[number, number]>
  jpGapRenew: (key: string, holder: string, ms: string) => Promise<number>
}

/** Milliseconds of an entry id (`<ms>-<seq>`). */
function msOf (entryId: string): number {
  return Number(entryId.slice(0, entryId.indexOf('-')))
}

/**
 * A job the plugin created, recorded by time, so that a final lost to a gap whose job BullMQ
 * already removed (`removeOnComplete` ...) is counted rather than skipped unseen. The record is
 * trimmed to `retentionMs` at every creation.
 */
export async function recordCreated (redis: Commands, keys: Keys, queue: string, jobId: string, retentionMs: number): Promise<void> {
  const now = Date.now()
  await redis.pipeline()
    .zadd(keys.created(queue), now, jobId)
    .zremrangebyscore(keys.created(queue), '-inf', now - retentionMs)
    .exec()
}

/**
 * Final states the stream lost, handed to the lifecycle listeners (webhooks, upload cleanup, the
 * feed) from what Redis still holds. When a gap is detected, one instance claims its window of
 * entry ids in the queue's gap record (one script: exactly one claimer); the window stays in the
 * record, with a cursor, until every page of it was handed over. Any instance holding the
 * queue's lease works the record's windows: the claimer at once, and, should it fail or die,
 * whichever instance's periodic check takes the lapsed lease next, from the saved cursor.
 *
 * A window is read in pages from sets ordered by time, each bounded by the window (padded by
 * {@link CLOCK_PAD_MS}): BullMQ's `completed` and `failed` (by `finishedOn`), the plugin's
 * cancels and, to count the jobs BullMQ already removed, the plugin's creations. Nothing reads
 * a set beyond the window, whatever the queue's size. A final inside the pad is handed over a
 * second time (once by the stream, once here): listeners are idempotent on the final
 * (webhooks' delivery id is derived from the job, the state and the attempt, see
 * {@link finalKey}), and a page handed over again after a failure is the other repeat.
 */
export class FinalRecovery {
  readonly #o: Options
  readonly #run: Running
  readonly #queues: readonly string[]
  #working: Promise<void> | null = null
  /** Pages read since start (for tests and the figures in docs/architecture.md). */
  pages = 0

  constructor (opts: Options, run: Running, queues: readonly string[]) {
    this.#o = opts
    this.#run = run
    this.#queues = queues
    const redis = opts.redis as WithGapScripts
    redis.defineCommand('jpGapClaim', { numberOfKeys: 1, lua: CLAIM_SCRIPT })
    redis.defineCommand('jpGapRenew', { numberOfKeys: 1, lua: RENEW_SCRIPT })
  }

  /** Whether anybody listens: without listeners there is nothing to recover for. */
  get enabled (): boolean {
    return this.#o.onEvent !== undefined
  }

  /**
   * After a check of a queue's stream: claims the entries lost since the record's last check
   * (see CLAIM_SCRIPT). `bound`: the stream's first entry id, or its last id once empty.
   * Resolves with whether windows wait to be recovered.
   */
  async checked (queue: string, deficit: number, trimmed: number, lastDelivered: string, bound: string): Promise<boolean> {
    const redis = this.#o.redis as WithGapScripts
    const [claimed, pending] = await redis.jpGapClaim(this.#o.keys.finalGaps(queue), 'trim', String(deficit), String(trimmed), lastDelivered, bound, lastDelivered)
    if (claimed === 1) this.#o.log.warn({ queue, deficit }, 'job-progress: entries were trimmed from the event stream before the bridge read them; recovering their final states')
    return pending > 0
  }

  /**
   * The group was made again (Redis came back without it): what followed the record's last
   * check may be lost, up to now; with no record (Redis came back empty), the retention.
   */
  async restarted (queue: string): Promise<void> {
    const now = Date.now()
    const redis = this.#o.redis as WithGapScripts
    const from = `${Math.max(0, now - (this.#o.recordRetentionMs ?? 0))}-0`
    await redis.jpGapClaim(this.#o.keys.finalGaps(queue), 'restart', '-1', '0', '0-0', `${now}-0`, from)
    this.#o.log.warn({ queue }, 'job-progress: the bridge group was made again; recovering the final states it may have missed')
  }

  /** Works the claimed windows in the background, one run at a time per instance. */
  resume (): void {
    if (this.#working !== null || !this.enabled || !this.#run.running) return
    this.#working = this.#work()
      .catch((err: Error) => this.#o.log.warn({ err }, 'job-progress: recovering final states failed; the next check retries from where it stopped'))
      .finally(() => { this.#working = null })
  }

  /** Waits for a run in flight (close). */
  async settle (): Promise<void> {
    await this.#working
  }

  async #work (): Promise<void> {
    const { redis, keys, consumer } = this.#o
    for (const queue of this.#queues) {
      if (!this.#run.running) return
      const lease = keys.finalGapsLease(queue)
      const record = await redis.hgetall(keys.finalGaps(queue))
      const windows = Object.keys(record).filter(f => f.startsWith('w:'))
      if (windows.length === 0) continue
      if (await redis.set(lease, consumer, 'PX', LEASE_MS, 'NX') === null) continue
      try {
        for (const field of windows) {
          if (!this.#run.running) return
          await this.#window(queue, field, record[field])
        }
      } finally {
        await redis.eval(RELEASE_SCRIPT, 1, lease, consumer).catch(() => {})
      }
    }
  }

  /** One window `w:<from>:<to>`, from its saved cursor to its end; then it leaves the record. */
  async #window (queue: string, field: string, saved: string): Promise<void> {
    const { redis, keys, consumer } = this.#o
    const [, from, to] = field.split(':')
    const cursor: Cursor = saved === '' ? { phase: 0, score: null, skip: 0, recovered: 0, gone: 0 } : JSON.parse(saved)
    const t = this.#o.telemetry ?? noTelemetry
    while (cursor.phase < PHASES.length) {
      if (!this.#run.running) return
      const phase = PHASES[cursor.phase]
      const set = phase === 'cancelled' ? keys.cancelled(queue) : phase === 'created' ? keys.created(queue) : keys.queueKey(queue, phase)
      // Creations are counted, not handed over: unpadded, so that jobs created around the gap and
      // ended outside it count as little as can be.
      const pad = phase === 'created' ? 0 : CLOCK_PAD_MS
      const lo = msOf(from) - pad
      const hi = msOf(to) + pad
      const page = await redis.zrangebyscore(set, cursor.score ?? lo, hi, 'WITHSCORES', 'LIMIT', cursor.skip, PAGE)
      this.pages++
      const members: Array<[string, number]> = []
      for (let i = 0; i + 1 < page.length; i += 2) members.push([page[i], Number(page[i + 1])])
      if (phase === 'created') {
        cursor.gone += await this.#gone(queue, members)
      } else {
        const found = await this.#finals(queue, phase, to, members)
        cursor.recovered += found
        if (found > 0) t.count('finalsRecovered', { queue, state: phase }, found)
      }
      // The next page starts at this page's last score, past the members of that score already read.
      if (members.length < PAGE) {
        cursor.phase++
        cursor.score = null
        cursor.skip = 0
      } else {
        const last = members[members.length - 1][1]
        const same = members.filter(([, score]) => score === last).length
        cursor.skip = cursor.score === last ? cursor.skip + same : same
        cursor.score = last
      }
      await redis.hset(keys.finalGaps(queue), field, JSON.stringify(cursor))
      await (redis as WithGapScripts).jpGapRenew(keys.finalGapsLease(queue), consumer, String(LEASE_MS))
    }
    if (cursor.gone > 0) {
      t.count('finalsGone', { queue }, cursor.gone)
      this.#o.log.warn({ queue, from, to, gone: cursor.gone }, 'job-progress: jobs whose final state a stream gap lost were already removed by BullMQ (removeOnComplete, removeOnFail): their webhooks and feed updates cannot be sent')
    }
    this.#o.log.info({ queue, from, to, recovered: cursor.recovered, gone: cursor.gone }, 'job-progress: final states of a stream gap recovered')
    await redis.hdel(keys.finalGaps(queue), field)
  }

  /** One page of finished or cancelled jobs, handed to the listeners; resolves with how many. */
  async #finals (queue: string, phase: Exclude<Phase, 'created'>, gapEnd: string, members: Array<[string, number]>): Promise<number> {
    const { redis, keys } = this.#o
    const onEvent = this.#o.onEvent
    if (onEvent === undefined || members.length === 0) return 0
    const events: BridgeEvent[] = []
    if (phase === 'cancelled') {
      for (const [member, score] of members) {
        const at = member.lastIndexOf(':')
        events.push({ queue, jobId: member.slice(0, at), event: 'cancelled', id: gapEnd, t: score, final: true, fields: {}, attempt: Number(member.slice(at + 1)), recovered: true })
      }
    } else {
      const field = phase === 'completed' ? 'returnvalue' : 'failedReason'
      const pipe = redis.pipeline()
      for (const [jobId] of members) pipe.hmget(keys.job(queue, jobId), field, 'finishedOn', 'ats', 'atm')
      const replies = await pipe.exec() ?? []
      members.forEach(([jobId, score], i) => {
        const [err, row] = replies[i] ?? [null, null]
        if (err !== null || row === null) throw err ?? new Error('no reply')
        const [value, finishedOn, ats, atm] = row as Array<string | null>
        // Removed since the page was read (BullMQ's retention by count or age): nothing to tell.
        if (finishedOn === null) return
        const attempt = Math.max(Number(ats ?? 0), Number(atm ?? 0), 1)
        events.push({ queue, jobId, event: phase, id: gapEnd, t: Number(finishedOn) || score, final: true, fields: value === null ? {} : { [field]: value }, attempt, recovered: true })
      })
    }
    // Every listener of the page succeeded before the cursor moves past it; else the page is
    // handed over again on the retry.
    await Promise.all(events.map(async event => await onEvent(event)))
    return events.length
  }

  /** One page of the created record: the jobs gone without a trace of their end. */
  async #gone (queue: string, members: Array<[string, number]>): Promise<number> {
    if (members.length === 0) return 0
    const { redis, keys } = this.#o
    const pipe = redis.pipeline()
    // Gone is: no job hash, not cancelled (its cancel mark) and not deleted through the plugin.
    for (const [jobId] of members) pipe.exists(keys.job(queue, jobId), keys.cancel(queue, jobId), keys.deleted(queue, jobId))
    const replies = await pipe.exec() ?? []
    return replies.filter(([err, n]) => err === null && n === 0).length
  }
}
