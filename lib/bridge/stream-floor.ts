import type { Commands } from '../core/snapshot'
import { compareEntryIds } from '../wire/version'

/**
 * KEYS[1] the stream; ARGV[1] the lowest last id it may have. Raises the stream's last id to it
 * with XSETID when it is below, and never lowers it: read and set in one script, so an entry
 * added meanwhile, or another instance raising to a lower id, cannot make it go back (XSETID
 * on an empty stream takes any id, lower ones too). Returns { 1 raised / 0 not needed / -1 no
 * stream, the last id it had }.
 *
 * XINFO is non-deterministic to Redis 6.2's verbatim script replication, which then refuses the
 * write after it: replicate_commands() replicates the effects instead (the default from Redis 7,
 * where it does nothing).
 */
const RAISE_SCRIPT = `
if redis.replicate_commands then redis.replicate_commands() end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local last = '0-0'
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then last = info[i + 1] break end
end
local function parts (id)
  local d = string.find(id, '-', 1, true)
  return string.sub(id, 1, d - 1), string.sub(id, d + 1)
end
-- Decimal strings without leading zeros: the longer is larger, else the string order decides.
local function below (a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local lm, ls = parts(last)
local fm, fs = parts(ARGV[1])
if below(lm, fm) or (lm == fm and below(ls, fs)) then
  redis.call('XSETID', KEYS[1], ARGV[1])
  return {1, last}
end
return {0, last}
`

/**
 * Keeps a queue's entry ids from going back (docs/architecture.md, "When entry ids go back").
 * Every version is `<attempt>.<entry id>`, and watchers drop a state whose entry id is below the
 * one they hold. A stream made again (Redis back without persistence, a restore from an older
 * AOF or RDB, a replica promoted behind, a host whose clock is behind) could hand out ids below
 * those: each instance remembers, per stream, the highest entry id it relayed or saw as the
 * stream's last, in its own memory (a key in Redis would be lost or restored with the stream),
 * and raises the stream's last id to it with XSETID when the group is made again or the stream
 * is found below it, before new entries are relayed.
 */
export class StreamFloor {
  readonly #highest = new Map<string, string>()

  /** Records an entry id of a stream (relayed, or read as its last); keeps the highest. */
  note (stream: string, id: string): void {
    const was = this.#highest.get(stream)
    if (was === undefined || compareEntryIds(id, was) > 0) this.#highest.set(stream, id)
  }

  /** The highest entry id known of a stream, if any. */
  highest (stream: string): string | undefined {
    return this.#highest.get(stream)
  }

  /** Whether `last` (a stream's last-generated-id) is below the highest id known of it. */
  behind (stream: string, last: string): boolean {
    const floor = this.#highest.get(stream)
    return floor !== undefined && compareEntryIds(last, floor) < 0
  }

  /**
   * Raises the stream's last id to the highest known, when it is below. Resolves with the last id
   * it had when it was raised, else null (nothing known, already at or above it, or no stream:
   * XSETID needs one, and the group's MKSTREAM makes it first).
   */
  async raise (redis: Commands, stream: string): Promise<string | null> {
    const floor = this.#highest.get(stream)
    if (floor === undefined) return null
    const [raised, last] = await redis.eval(RAISE_SCRIPT, 1, stream, floor) as [number, string]
    return raised === 1 ? last : null
  }
}
