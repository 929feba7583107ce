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
 * One script on the owner's key (one slot, so it runs on a Redis Cluster too): counts the owner's
 * connections on the instances known alive (ARGV[4..]), forgets those of instances known dead
 * (when ARGV[3] is '1'), and takes a slot for this instance when one is free. Returns 1 (taken),
 * 0 (full), or the list of instances it does not know (the caller reads who is alive and asks
 * again).
 */
const ACQUIRE = `
local counts = redis.call('HGETALL', KEYS[1])
local alive = {}
for i = 4, #ARGV do alive[ARGV[i]] = true end
local total = 0
local unknown = {}
for i = 1, #counts, 2 do
  local id, n = counts[i], tonumber(counts[i + 1])
  if id == ARGV[1] or alive[id] then
    total = total + n
  elseif ARGV[3] == '1' then
    redis.call('HDEL', KEYS[1], id)
  else
    unknown[#unknown + 1] = id
  end
end
if #unknown > 0 then return unknown end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
return 1
`

const RELEASE = `
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
`

interface Scripts {
  jpConnAcquire: (...args: string[]) => Promise<unknown>
  jpConnRelease: (...args: string[]) => Promise<unknown>
}

/**
 * The per-owner connection limit across every instance. Each instance keeps, per owner, its own
 * count in one Redis hash (`<channelPrefix>:conns:{<owner>}`, field = instance id), and says it is alive
 * in a sorted set (`<channelPrefix>:instances`, score = last heartbeat) from one timer per instance. A
 * connection costs one script call when it opens and one when it closes; the heartbeat costs
 * two commands per interval per instance, whatever the number of connections. A killed
 * instance's counts stop counting once its heartbeat is older than three intervals, and are
 * removed by the next connect of that owner. When Redis cannot be reached the limit falls back
 * to this instance's own count, so an outage does not lock everybody out.
 */
export class ConnectionLimit {
  readonly #o: ConnectionLimitOptions
  readonly #local = new Map<string, number>()
  readonly #instances: string
  #alive: string[] = []
  #timer: NodeJS.Timeout | null = null

  constructor (opts: ConnectionLimitOptions) {
    this.#o = opts
    this.#instances = opts.keys.instances()
    // By hash (EVALSHA), not by text: a storm of connections would otherwise send and hash both
    // scripts once per socket.
    const r = opts.redis as Redis & Partial<Scripts>
    if (typeof r.jpConnAcquire !== 'function') {
      opts.redis.defineCommand('jpConnAcquire', { numberOfKeys: 1, lua: ACQUIRE })
      opts.redis.defineCommand('jpConnRelease', { numberOfKeys: 1, lua: RELEASE })
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
    }
  }

  async #readAlive (): Promise<void> {
    this.#alive = await this.#o.redis.zrangebyscore(this.#instances, String(Date.now() - 3 * this.#o.heartbeatMs), '+inf')
  }

  /** Takes a connection slot for `owner`; false when the owner is at the limit on all instances together. */
  async acquire (owner: string): Promise<boolean> {
    const local = this.#local.get(owner) ?? 0
    if (local >= this.#o.max) return false
    let taken: boolean
    try {
      taken = await this.#acquire(owner)
    } catch (err) {
      this.#o.log.warn({ err }, 'job-progress: cannot count connections across instances (Redis); counting this instance only')
      taken = true
    }
    if (taken) this.#local.set(owner, local + 1)
    return taken
  }

  async #acquire (owner: string): Promise<boolean> {
    const call = async (forget: boolean): Promise<unknown> => await this.#scripts.jpConnAcquire(this.#key(owner), this.#o.instanceId, String(this.#o.max), forget ? '1' : '0', ...this.#alive)
    let reply = await call(false)
    if (Array.isArray(reply)) {
      // Counts of an instance this one has not heard of yet: a new instance, or a dead one.
      await this.#readAlive()
      reply = await call(true)
    }
    return reply === 1
  }

  /** Gives back a slot taken with {@link acquire}. */
  release (owner: string): void {
    const local = (this.#local.get(owner) ?? 1) - 1
    if (local > 0) this.#local.set(owner, local)
    else this.#local.delete(owner)
    this.#scripts.jpConnRelease(this.#key(owner), this.#o.instanceId).catch((err: Error) => {
      this.#o.log.debug({ err }, 'job-progress: cannot give back a connection slot; it lapses with this instance')
    })
  }

  /** At shutdown: this instance's counts and its heartbeat go at once, not after the lapse. */
  async close (): Promise<void> {
    if (this.#timer !== null) clearInterval(this.#timer)
    const pipe = this.#o.redis.pipeline()
    for (const owner of this.#local.keys()) pipe.hdel(this.#key(owner), this.#o.instanceId)
    pipe.zrem(this.#instances, this.#o.instanceId)
    this.#local.clear()
    await pipe.exec().catch(() => {})
  }
}
