import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import type { Keys } from '../core/keys'

export interface ConnectionLimitOptions {
  /** The plugin's command connection. */
  redis: Redis
  /** The plugin's keys (the counts live under its `channelPrefix`). */
  keys: Keys
  instanceId: string
  /** Connections one owner may hold across all instances. */
  max: number
  /** How often this instance says it is alive; an instance silent for 3 of these is counted dead. */
  heartbeatMs: number
  log: FastifyBaseLogger
}

/**
 * Takes a slot, by the connection's id, on the owner's key only (one slot, so it runs on a Redis
 * Cluster too). The owner's hash maps each open connection's id to the instance holding it; the
 * count is the number of ids held by instances known alive (ARGV[5..]) or by this one (ARGV[2]).
 * Ids of instances known dead are removed when ARGV[4] is '1'. Idempotent: an id already there
 * (a command sent again after a reconnect) is not counted twice. Returns 1 (taken), 0 (full), or
 * the list of instances it does not know (the caller reads who is alive and asks again).
 */
const ACQUIRE = `
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 1 end
local ids = redis.call('HGETALL', KEYS[1])
local alive = {}
for i = 5, #ARGV do alive[ARGV[i]] = true end
local total = 0
local unknown = {}
local seen = {}
for i = 1, #ids, 2 do
  local instance = ids[i + 1]
  if instance == ARGV[2] or alive[instance] then
    total = total + 1
  elseif ARGV[4] == '1' then
    redis.call('HDEL', KEYS[1], ids[i])
  elseif not seen[instance] then
    seen[instance] = true
    unknown[#unknown + 1] = instance
  end
end
if #unknown > 0 then return unknown end
if total >= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
`

/**
 * This instance's ids of one owner that are not in ARGV[2..] (its connections still open or
 * opening) go: what a failed release, or a take sent again after its connection closed, left.
 */
const REPAIR = `
local ids = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 2, #ARGV do live[ARGV[i]] = true end
local removed = 0
for i = 1, #ids, 2 do
  if ids[i + 1] == ARGV[1] and not live[ids[i]] then
    redis.call('HDEL', KEYS[1], ids[i])
    removed = removed + 1
  end
end
return removed
`

interface Scripts {
  jpConnTake: (...args: string[]) => Promise<unknown>
  jpConnRepair: (...args: string[]) => Promise<unknown>
}

/**
 * The per-owner connection limit across every instance. Each open connection has an id; the
 * owner's hash (`<channelPrefix>:conn-ids:{<owner>}`) holds the ids of its open connections, each
 * with the instance holding it, and the limit is the number of ids held by live instances. Taking
 * and giving back a slot are idempotent (a set of ids, not a counter), so a command sent twice,
 * or a give-back that races a take, cannot make the count drift.
 *
 * Instances say they are alive in a sorted set (`<channelPrefix>:instances`, score = last
 * heartbeat) from one timer per instance. A connection costs one script call when it opens and
 * one HDEL when it closes; the heartbeat costs two commands per interval per instance, plus one
 * repair call per owner whose slot could not be given back (Redis away), whatever the number of
 * connections. So:
 * - a slot goes with its connection however that ends (the session gives it back on close);
 * - a give-back that failed is retried at every heartbeat until Redis takes it, and whatever
 *   this instance left in Redis that it no longer holds is removed then;
 * - a killed instance's ids stop counting once its heartbeat is older than three intervals, and
 *   are removed by the next connect of that owner.
 * When Redis cannot be reached the limit falls back to this instance's own connections, so an
 * outage does not lock everybody out; the owner's ids are put right at the next heartbeat.
 */
export class ConnectionLimit {
  readonly #o: ConnectionLimitOptions
  /** Per owner, the ids of this instance's connections that hold (or are taking) a slot. */
  readonly #held = new Map<string, Set<string>>()
  /** Owners whose ids in Redis may differ from {@link #held}: repaired at the next heartbeat. */
  readonly #dirty = new Set<string>()
  readonly #instances: string
  #alive: string[] = []
  #timer: NodeJS.Timeout | null = null
  #next = 0

  constructor (opts: ConnectionLimitOptions) {
    this.#o = opts
    this.#instances = opts.keys.instances()
    // By hash (EVALSHA), not by text: a storm of connections would otherwise send and hash the
    // script once per socket.
    const r = opts.redis as Redis & Partial<Scripts>
    if (typeof r.jpConnTake !== 'function') {
      opts.redis.defineCommand('jpConnTake', { numberOfKeys: 1, lua: ACQUIRE })
      opts.redis.defineCommand('jpConnRepair', { numberOfKeys: 1, lua: REPAIR })
    }
  }

  get #scripts (): Scripts {
    return this.#o.redis as unknown as Scripts
  }

  #key (owner: string): string {
    return this.#o.keys.connections(owner)
  }

  /** Registers this instance as alive and keeps it so. */
  async start (): Promise<void> {
    await this.#heartbeat()
    this.#timer = setInterval(() => { void this.#heartbeat() }, this.#o.heartbeatMs).unref()
  }

  async #heartbeat (): Promise<void> {
    const now = Date.now()
    try {
      const [, , alive] = await this.#o.redis.multi()
        .zadd(this.#instances, String(now), this.#o.instanceId)
        .zremrangebyscore(this.#instances, '-inf', String(now - 3 * this.#o.heartbeatMs))
        .zrange(this.#instances, '0', '-1')
        .exec() ?? []
      if (alive?.[0] === null && Array.isArray(alive[1])) this.#alive = alive[1] as string[]
    } catch (err) {
      this.#o.log.debug({ err }, 'job-progress: connection-limit heartbeat failed; will retry')
      return
    }
    await this.#repair()
  }

  /** Puts right the ids of the owners whose give-back or take failed: per owner, one call. */
  async #repair (): Promise<void> {
    for (const owner of [...this.#dirty]) {
      this.#dirty.delete(owner)
      try {
        await this.#scripts.jpConnRepair(this.#key(owner), this.#o.instanceId, ...(this.#held.get(owner) ?? []))
      } catch (err) {
        this.#dirty.add(owner)
        this.#o.log.debug({ err }, 'job-progress: cannot put connection slots right yet; will retry')
        return
      }
    }
  }

  async #readAlive (): Promise<void> {
    this.#alive = await this.#o.redis.zrangebyscore(this.#instances, String(Date.now() - 3 * this.#o.heartbeatMs), '+inf')
  }

  /**
   * Takes a connection slot for `owner`: resolves with the slot's id (give it to
   * {@link release}), or null when the owner is at the limit on all instances together.
   */
  async acquire (owner: string): Promise<string | null> {
    let held = this.#held.get(owner)
    if ((held?.size ?? 0) >= this.#o.max) return null
    // Held from now on, before any await: this instance's count is exact whatever runs meanwhile.
    const id = `${this.#o.instanceId}:${(this.#next++).toString(36)}`
    if (held === undefined) this.#held.set(owner, held = new Set())
    held.add(id)
    let taken: boolean
    try {
      taken = await this.#take(owner, id)
    } catch (err) {
      this.#o.log.warn({ err }, 'job-progress: cannot count connections across instances (Redis); counting this instance only')
      // The take may still reach Redis (sent again after a reconnect): the next heartbeat checks.
      this.#dirty.add(owner)
      taken = true
    }
    if (!taken) this.#forget(owner, id)
    return taken ? id : null
  }

  async #take (owner: string, id: string): Promise<boolean> {
    const call = async (forget: boolean): Promise<unknown> => await this.#scripts.jpConnTake(this.#key(owner), id, this.#o.instanceId, String(this.#o.max), forget ? '1' : '0', ...this.#alive)
    let reply = await call(false)
    if (Array.isArray(reply)) {
      // Ids of an instance this one has not heard of yet: a new instance, or a dead one.
      await this.#readAlive()
      reply = await call(true)
    }
    return reply === 1
  }

  #forget (owner: string, id: string): boolean {
    const held = this.#held.get(owner)
    if (held === undefined || !held.delete(id)) return false
    if (held.size === 0) this.#held.delete(owner)
    return true
  }

  /** Gives back a slot taken with {@link acquire}; a second call for one id does nothing. */
  release (owner: string, id: string): void {
    if (!this.#forget(owner, id)) return
    this.#o.redis.hdel(this.#key(owner), id).catch((err: Error) => {
      this.#dirty.add(owner)
      this.#o.log.debug({ err }, 'job-progress: cannot give back a connection slot yet; retried at the next heartbeat')
    })
  }

  /** At shutdown: this instance's ids and its heartbeat go at once, not after the lapse. */
  async close (): Promise<void> {
    if (this.#timer !== null) clearInterval(this.#timer)
    const owners = new Set([...this.#held.keys(), ...this.#dirty])
    const held = new Map(this.#held)
    this.#held.clear()
    this.#dirty.clear()
    // One call per owner (their keys are in different slots on a cluster), none waiting on another.
    await Promise.all([
      ...[...owners].map(async owner => {
        const ids = [...held.get(owner) ?? []]
        await (ids.length > 0 ? this.#o.redis.hdel(this.#key(owner), ...ids) : this.#scripts.jpConnRepair(this.#key(owner), this.#o.instanceId))
      }),
      this.#o.redis.zrem(this.#instances, this.#o.instanceId)
    ].map(async p => { await p.catch(() => {}) }))
  }
}
