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
 * The owner's count per instance (KEYS[2]), as a Lua table, checked against its ids (KEYS[1]):
 * when they disagree (ids written by an older version, which kept no counts) the counts are
 * made again from the ids, once. So a call costs one read per instance, not per connection.
 */
const COUNTS = `
local function counts()
  local flat = redis.call('HGETALL', KEYS[2])
  local by, sum = {}, 0
  for i = 1, #flat, 2 do
    local n = tonumber(flat[i + 1])
    by[flat[i]] = n
    sum = sum + n
  end
  if sum == redis.call('HLEN', KEYS[1]) then return by end
  by = {}
  local ids = redis.call('HGETALL', KEYS[1])
  for i = 2, #ids, 2 do by[ids[i]] = (by[ids[i]] or 0) + 1 end
  redis.call('DEL', KEYS[2])
  for instance, n in pairs(by) do redis.call('HSET', KEYS[2], instance, n) end
  return by
end
`

/**
 * Takes slots, by the connections' ids, on the owner's keys only (one slot, so it runs on a Redis
 * Cluster too): every connection of one owner that opened on this instance in one turn of the
 * event loop, in one call. The owner's hash (KEYS[1]) maps each open connection's id to the
 * instance holding it, and KEYS[2] counts them per instance; the count is the number of ids held
 * by this instance (ARGV[1]), by instances known alive (ARGV[5 + k ..]), and by instances this one
 * has not heard of (a new one, or a dead one: counted until the caller has read who is alive, so
 * a new instance's connections count at once). With ARGV[3] = '1' (who is alive was just read)
 * the ids of instances not alive are removed instead: the one call that reads every id, once per
 * dead instance. ARGV[4] is k, the number of ids (ARGV[5 .. 4 + k]). Idempotent: an id already
 * there (a call sent again after a reconnect) is not counted twice. Returns each id's answer (1
 * taken, 0 full), then the instances it did not know.
 */
const ACQUIRE = `${COUNTS}
local k = tonumber(ARGV[4])
local alive = {}
for i = 5 + k, #ARGV do alive[ARGV[i]] = true end
local total = 0
local unknown = {}
local dead = nil
for instance, n in pairs(counts()) do
  if instance == ARGV[1] or alive[instance] then
    total = total + n
  elseif ARGV[3] == '1' then
    dead = dead or {}
    dead[instance] = true
  else
    total = total + n
    unknown[#unknown + 1] = instance
  end
end
if dead then
  local ids = redis.call('HGETALL', KEYS[1])
  for i = 1, #ids, 2 do
    if dead[ids[i + 1]] then redis.call('HDEL', KEYS[1], ids[i]) end
  end
  for instance in pairs(dead) do redis.call('HDEL', KEYS[2], instance) end
end
local max = tonumber(ARGV[2])
local answers = {}
for j = 1, k do
  local id = ARGV[4 + j]
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    answers[j] = 1
  elseif total < max then
    redis.call('HSET', KEYS[1], id, ARGV[1])
    redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
    total = total + 1
    answers[j] = 1
  else
    answers[j] = 0
  end
end
return {answers, unknown}
`

/** This instance's (ARGV[1]) count goes down by `n` ids given back; a count at 0 goes. */
const UNCOUNT = `
local function uncount(n)
  if n > 0 and redis.call('HINCRBY', KEYS[2], ARGV[1], -n) <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
end
`

/** Gives back ids of this instance (ARGV[1]): ARGV[2..]. An id not there any more is not counted. */
const RELEASE = `${UNCOUNT}
local n = 0
for i = 2, #ARGV do n = n + redis.call('HDEL', KEYS[1], ARGV[i]) end
uncount(n)
return n
`

/**
 * This instance's ids of one owner that are not in ARGV[2..] (its connections still open or
 * opening) go: what a failed release, or a take sent again after its connection closed, left.
 * Reads every id of the owner: only after a failure, at a heartbeat.
 */
const REPAIR = `${UNCOUNT}
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
uncount(removed)
return removed
`

interface Take {
  id: string
  refused: () => void
  confirmed?: () => void
}

interface Scripts {
  jpConnTake: (...args: string[]) => Promise<unknown>
  jpConnRelease: (...args: string[]) => Promise<unknown>
  jpConnRepair: (...args: string[]) => Promise<unknown>
}

/**
 * The per-owner connection limit across every instance. Each open connection has an id; the
 * owner's hash (`<channelPrefix>:conn-ids:{<owner>}`) holds the ids of its open connections, each
 * with the instance holding it, and the limit is the number of ids held by live instances. Taking
 * and giving back a slot are idempotent (a set of ids, not a counter), so a command sent twice,
 * or a give-back that races a take, cannot make the count drift. Beside it, in the same slot,
 * `<channelPrefix>:conn-n:{<owner>}` counts the ids per instance, changed in the same scripts: a
 * take reads one count per instance, not every id, so an owner allowed thousands of connections
 * (a service's API key) costs what an owner with three does.
 *
 * Instances say they are alive in a sorted set (`<channelPrefix>:instances`, score = last
 * heartbeat) from one timer per instance. Connections cost one script call per owner and turn of
 * the event loop when they open (not awaited by the connection: see {@link take}) and one
 * script call each when they close; the heartbeat costs two commands per interval per instance, plus one
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
      opts.redis.defineCommand('jpConnTake', { numberOfKeys: 2, lua: ACQUIRE })
      opts.redis.defineCommand('jpConnRelease', { numberOfKeys: 2, lua: RELEASE })
      opts.redis.defineCommand('jpConnRepair', { numberOfKeys: 2, lua: REPAIR })
    }
  }

  get #scripts (): Scripts {
    return this.#o.redis as unknown as Scripts
  }

  /** The owner's ids and its counts per instance (one slot). */
  #keys (owner: string): [string, string] {
    return [this.#o.keys.connections(owner), this.#o.keys.connectionCounts(owner)]
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
        await this.#scripts.jpConnRepair(...this.#keys(owner), this.#o.instanceId, ...(this.#held.get(owner) ?? []))
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
    return await new Promise(resolve => {
      const id = this.take(owner, () => resolve(null), () => resolve(id))
      if (id === null) resolve(null)
    })
  }

  /**
   * Takes a slot for `owner` at once, on this instance's count, and confirms it across instances
   * in the background: the slot's id (give it to {@link release}), or null when this instance
   * alone holds the limit already. `refused` is called if the owner turns out to be at the limit
   * on all instances together (the id is then given back already), `confirmed` once it is not.
   *
   * A connection does not wait on Redis to start: the confirmation is one script call for every
   * connection of the owner that opened in the same turn, sent before any read of theirs. On one
   * Redis, the command connection answers in order, so a refusal arrives before any job data
   * read for that connection after it opened.
   */
  take (owner: string, refused: () => void, confirmed?: () => void): string | null {
    let held = this.#held.get(owner)
    if ((held?.size ?? 0) >= this.#o.max) return null
    // Held from now on: this instance's count is exact whatever runs meanwhile.
    const id = `${this.#o.instanceId}:${(this.#next++).toString(36)}`
    if (held === undefined) this.#held.set(owner, held = new Set())
    held.add(id)
    let batch = this.#takes.get(owner)
    if (batch === undefined) {
      if (this.#takes.size === 0) setImmediate(this.#flush)
      this.#takes.set(owner, batch = [])
    }
    batch.push({ id, refused, confirmed })
    return id
  }

  /** Takes of one turn, per owner, sent as one script call each. */
  readonly #takes = new Map<string, Take[]>()

  readonly #flush = (): void => {
    const takes = [...this.#takes]
    this.#takes.clear()
    for (const [owner, batch] of takes) {
      // Given back before the call went out (the client left at once): nothing to take.
      const live = batch.filter(t => this.#held.get(owner)?.has(t.id) === true)
      if (live.length > 0) void this.#confirm(owner, live)
    }
  }

  async #confirm (owner: string, batch: Take[]): Promise<void> {
    let answers: boolean[]
    try {
      answers = await this.#take(owner, batch.map(t => t.id))
    } catch (err) {
      this.#o.log.warn({ err }, 'job-progress: cannot count connections across instances (Redis); counting this instance only')
      // The take may still reach Redis (sent again after a reconnect): the next heartbeat checks.
      this.#dirty.add(owner)
      answers = batch.map(() => true)
    }
    batch.forEach((t, i) => {
      if (!answers[i]) {
        if (this.#forget(owner, t.id)) t.refused()
      } else if (this.#held.get(owner)?.has(t.id) === true) {
        t.confirmed?.()
      } else {
        // Given back while its take was on the way (its HDEL may have run first): whatever is
        // left in Redis that this instance no longer holds goes at the next heartbeat.
        this.#dirty.add(owner)
      }
    })
  }

  async #take (owner: string, ids: string[]): Promise<boolean[]> {
    const call = async (forget: boolean, asked: string[]): Promise<[number[], string[]]> => await this.#scripts.jpConnTake(...this.#keys(owner), this.#o.instanceId, String(this.#o.max), forget ? '1' : '0', String(asked.length), ...asked, ...this.#alive) as [number[], string[]]
    const [answers, unknown] = await call(false, ids)
    const out = answers.map(a => a === 1)
    if (unknown.length === 0 || out.every(Boolean)) {
      // Ids of an instance this one has not heard of: a new instance, or a dead one. Counted
      // for now; who is alive is read again off the connection's path.
      if (unknown.length > 0) this.#readAlive().catch(() => {})
      return out
    }
    // Refused while counting instances it did not know: read who is alive, and ask again for
    // the refused ones with the ids of dead instances removed.
    await this.#readAlive()
    // Only the ids still held: one given back meanwhile must not be taken again after its HDEL.
    const again = ids.filter((id, i) => !out[i] && this.#held.get(owner)?.has(id) === true)
    if (again.length === 0) return out
    const [second] = await call(true, again)
    const taken = new Set(again.filter((_, j) => second[j] === 1))
    return ids.map((id, i) => out[i] || taken.has(id))
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
    this.#scripts.jpConnRelease(...this.#keys(owner), this.#o.instanceId, id).catch((err: Error) => {
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
        await (ids.length > 0 ? this.#scripts.jpConnRelease(...this.#keys(owner), this.#o.instanceId, ...ids) : this.#scripts.jpConnRepair(...this.#keys(owner), this.#o.instanceId))
      }),
      this.#o.redis.zrem(this.#instances, this.#o.instanceId)
    ].map(async p => { await p.catch(() => {}) }))
  }
}
