import type { Redis } from 'ioredis'
import { createHash } from 'node:crypto'
import type { Keys } from '../../core/keys'

/**
 * What the cancel (`cancel.ts`) and delete (`delete.ts`) scripts share: the keys of a job and
 * its queue they both read, in one order, and the Lua that takes a job out of its queue and ends
 * with an event in the queue's stream. Each script decides on its own whether it may act; what it
 * does then is written once here.
 *
 * KEYS[1..13]: the job hash, the queue's wait, paused, active, prioritized, delayed,
 * waiting-children, completed, failed, stalled, events and meta keys, and the job's cancel mark.
 * The job's own sub-keys (`:lock`, `:logs` ...) are derived from its key inside the script, as
 * BullMQ's own scripts do.
 */
export function jobScriptKeys (keys: Keys, queue: string, jobId: string): string[] {
  const q = (name: string): string => keys.queueKey(queue, name)
  return [
    keys.job(queue, jobId), q('wait'), q('paused'), q('active'), q('prioritized'), q('delayed'),
    q('waiting-children'), q('completed'), q('failed'), q('stalled'), q('events'), q('meta'),
    keys.cancel(queue, jobId)
  ]
}

/**
 * Lua that takes `jobId` out of whichever list or set of its queue holds it and sets `prev` to
 * that state's name; `ended` also looks in the completed and failed sets (a delete may remove a
 * finished job, a cancel never does).
 */
export function takeOutLua (ended: boolean): string {
  const sets: Array<[number, string, string]> = [
    [4, 'LREM', 'active'],
    ...(ended ? [[8, 'ZREM', 'completed'], [9, 'ZREM', 'failed']] as Array<[number, string, string]> : []),
    [6, 'ZREM', 'delayed'], [5, 'ZREM', 'prioritized'], [7, 'ZREM', 'waiting-children'], [3, 'LREM', 'paused']
  ]
  const removed = (key: number, command: string): string =>
    command === 'LREM' ? `rcall("LREM", KEYS[${key}], 0, jobId) > 0` : `rcall("ZREM", KEYS[${key}], jobId) > 0`
  return [
    'local prev = "waiting"',
    ...sets.map(([key, command, state], i) => `${i === 0 ? 'if' : 'elseif'} ${removed(key, command)} then prev = "${state}"`),
    'else rcall("LREM", KEYS[2], 0, jobId) end',
    'rcall("SREM", KEYS[10], jobId)'
  ].join('\n')
}

/** Lua that deletes the job hash and its sub-keys, plus any `extra` keys named in Lua. */
export function deleteJobLua (extra = ''): string {
  return `rcall("DEL", jobKey, jobKey .. ":lock", jobKey .. ":logs", jobKey .. ":dependencies",
  jobKey .. ":processed", jobKey .. ":failed", jobKey .. ":unsuccessful"${extra === '' ? '' : ', ' + extra})`
}

/**
 * Lua that XADDs `event` for the job to the queue's event stream, trimmed like BullMQ trims it;
 * `extra` adds fields, written in Lua (`, "attempt", attempt`).
 */
export function eventLua (event: string, extra = ''): string {
  return `local maxEvents = rcall("HGET", KEYS[12], "opts.maxLenEvents") or 10000
rcall("XADD", KEYS[11], "MAXLEN", "~", maxEvents, "*", "event", "${event}", "jobId", jobId, "prev", prev${extra})`
}

/** A script run by its digest, loaded on the first NOSCRIPT (a restarted or failed-over Redis). */
export class JobScript {
  readonly #source: string
  readonly #sha: string

  constructor (body: string) {
    this.#source = 'local rcall = redis.call\nlocal jobId = ARGV[1]\nlocal jobKey = KEYS[1]\n' + body
    this.#sha = createHash('sha1').update(this.#source).digest('hex')
  }

  async run (redis: Redis, keyList: string[], args: string[]): Promise<unknown> {
    try {
      return await redis.evalsha(this.#sha, keyList.length, ...keyList, ...args)
    } catch (err) {
      if (!String((err as Error).message).includes('NOSCRIPT')) throw err
      return await redis.eval(this.#source, keyList.length, ...keyList, ...args)
    }
  }
}
