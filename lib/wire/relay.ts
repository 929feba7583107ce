/**
 * The relay codec: the small message the bridge publishes on a job's channel for each event it
 * reads from the queue's BullMQ event stream, and its parser. Every message carries the stream
 * entry id it came from, so a receiver orders messages and snapshots by version, not by arrival.
 *
 * This module has no server dependencies.
 */

/** BullMQ events that change what a watcher should see; the rest (added, drained ...) are skipped. */
export const RELAYED = new Set(['progress', 'active', 'waiting', 'delayed', 'stalled', 'completed', 'failed', 'removed', 'cancelled'])

/** BullMQ's final events, plus the plugin's own `cancelled`. */
export const FINAL_EVENTS = new Set(['completed', 'failed', 'cancelled'])

/**
 * The error a watcher gets, as a `failed` final state, when a job it watched vanished from Redis
 * without a final event (Redis restarted empty, the queue was obliterated). Every client treats
 * `failed` as final, so nobody waits on a job that no longer exists.
 */
export const JOB_LOST = 'job_lost'

/**
 * The relay format's version, sent as `v` in every message; a message without `v` is version 1
 * (instances from before the field). The format only ever grows: a new version adds fields or
 * event names, never changes or removes one, and a receiver reads the fields it knows from a
 * message of any version and treats an event name it does not know as "something changed:
 * re-read". So during a rolling upgrade instances of versions N and N+1 share one Redis both
 * ways: the older ignores what it does not know, the newer reads the older's messages as they
 * are. A change that cannot be made that way needs new channel names, not a new `v`.
 */
export const RELAY_VERSION = 2

/** The message on a job's channel. */
export interface RelayMessage {
  /** The sender's relay format version (1 when the message carries none). */
  v: number
  /** BullMQ's event name (`progress`, `active`, `completed` ...) or `cancelled`. */
  e: string
  /** Milliseconds, when the event happened. */
  t: number
  /** The stream entry id of the event; absent on messages that did not come from the stream. */
  i?: string
  /** The progress value, on `progress`. */
  d?: unknown
  /** The fault, on {@link RESYNC}. */
  c?: string
}

/**
 * The event name of a message the bridge sends on every watched channel of a queue after a fault
 * that can have lost events (the stream trimmed past the group, Redis back empty): re-read.
 * Such a message carries `c`, the cause.
 */
export const RESYNC = 'resync'

const ENTRY_ID = /^\d+-\d+$/

/** Builds the message for a job's channel from a stream entry, or null when it is not relayed. */
export function relayMessage (id: string, fields: string[]): { jobId: string, payload: string } | null {
  let event = ''
  let jobId = ''
  let data: string | null = null
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]
    if (name === 'event') event = fields[i + 1]
    else if (name === 'jobId') jobId = fields[i + 1]
    else if (name === 'data') data = fields[i + 1]
  }
  if (jobId === '' || !RELAYED.has(event)) return null
  const t = Number(id.slice(0, id.indexOf('-')))
  // The progress value is already JSON in the stream: splice it in instead of parsing it.
  const payload = event === 'progress' && data !== null
    ? `{"v":${RELAY_VERSION},"e":"progress","t":${t},"i":"${id}","d":${data}}`
    : `{"v":${RELAY_VERSION},"e":"${event}","t":${t},"i":"${id}"}`
  return { jobId, payload }
}

/** How every message {@link relayMessage} builds begins; what follows `e` is `,"t":<ms>,"i":"<id>"`. */
const OWN_HEAD = `{"v":${RELAY_VERSION},"e":"`

/**
 * The stream entry id of a message in this version's own layout, read without parsing it (a
 * receiver drops what its state already reflects, e.g. the copy of a message its own bridge
 * handed over, before paying for JSON.parse); null when the message is laid out otherwise (an
 * other version, a resync): parse it.
 */
export function relayEntryId (raw: string): string | null {
  if (!raw.startsWith(OWN_HEAD)) return null
  // Nothing before `i` can hold a quote: the event is a bare name and `t` a number.
  const at = raw.indexOf('","t":', OWN_HEAD.length)
  if (at < 0) return null
  let start = at + 6
  while (start < raw.length && raw.charCodeAt(start) >= 48 && raw.charCodeAt(start) <= 57) start++
  if (!raw.startsWith(',"i":"', start)) return null
  const end = raw.indexOf('"', start + 6)
  if (end < 0) return null
  const id = raw.slice(start + 6, end)
  return ENTRY_ID.test(id) ? id : null
}

/** Reads a channel message; null for anything malformed (dropped, never thrown). */
export function parseRelay (raw: string): RelayMessage | null {
  let message: unknown
  try {
    message = JSON.parse(raw)
  } catch {
    return null
  }
  if (message === null || typeof message !== 'object') return null
  const m = message as Record<string, unknown>
  if (typeof m.e !== 'string') return null
  const v = typeof m.v === 'number' && Number.isInteger(m.v) && m.v >= 1 ? m.v : 1
  const out: RelayMessage = { v, e: m.e, t: typeof m.t === 'number' ? m.t : Date.now() }
  if (typeof m.i === 'string' && ENTRY_ID.test(m.i)) out.i = m.i
  if ('d' in m) out.d = m.d
  if (typeof m.c === 'string') out.c = m.c
  return out
}

/** The {@link RESYNC} message of a fault, with its cause. */
export function resyncMessage (cause: string, now = Date.now()): string {
  return JSON.stringify({ v: RELAY_VERSION, e: RESYNC, t: now, c: cause })
}

/**
 * A log line the worker helper wrote (relay format 3): not from the event stream, so it has no
 * `i`; `o` is the line's absolute offset in the job's log, `l` the line. Every log message starts
 * with {@link LOG_PREFIX} exactly, so a receiver tells it from a state message without parsing.
 */
export const LOG_EVENT = 'log'
export const LOG_PREFIX = '{"v":3,"e":"log",'

/** The log message, split where its offset goes (the worker's script splices the offset in). */
export function logMessageParts (line: string, now = Date.now()): [head: string, tail: string] {
  return [`${LOG_PREFIX}"t":${now},"o":`, `,"l":${JSON.stringify(line)}}`]
}

/** Reads a log message; null for anything else or malformed. */
export function parseLogRelay (raw: string): { t: number, o: number, l: string } | null {
  if (!raw.startsWith(LOG_PREFIX)) return null
  let m: Record<string, unknown>
  try {
    m = JSON.parse(raw)
  } catch {
    return null
  }
  if (typeof m.o !== 'number' || !Number.isInteger(m.o) || m.o < 0 || typeof m.l !== 'string') return null
  return { t: typeof m.t === 'number' ? m.t : Date.now(), o: m.o, l: m.l }
}
