import { FINAL_EVENTS as FINAL } from '../wire/relay'

/**
 * One stream entry the bridge relayed, as handed to `onEvent` listeners (upload cleanup,
 * webhooks). The bridge is at-least-once: a listener can see the same `id` twice and must be
 * idempotent on it.
 */
export interface BridgeEvent {
  /** The queue's name. */
  queue: string
  jobId: string
  /** BullMQ's event name (`progress`, `completed`, `failed` ...) or `cancelled`. */
  event: string
  /** The stream entry id: unique per event and ordered within the queue. */
  id: string
  /** Milliseconds since the epoch, from the entry id. */
  t: number
  /** Whether the job ended with this event. */
  final: boolean
  /** The entry's other fields as BullMQ wrote them (`returnvalue`, `failedReason`, `data` ...). */
  fields: Record<string, string>
  /**
   * The attempt that ended, when the event says it (a recovered final, the plugin's `cancelled`);
   * else a listener that needs it reads the job (see {@link finalKey}).
   */
  attempt?: number
  /**
   * True for a final recovered after a stream gap (lib/bridge/final-recovery.ts): it has no
   * entry of its own, `id` is the gap's last entry id (newer than any entry of the job read before
   * the gap) and `t` when the job finished.
   */
  recovered?: true
}

/**
 * What names a final state on every path, the stream's and a gap's recovery alike: its state
 * and the attempt that reached it (a job retried after it ended can end again). Never the entry
 * id: a final recovered after a gap has none.
 */
export function finalKey (state: string, attempt: number): string {
  return `${state}.${attempt}`
}

/**
 * One `onEvent` for several listeners: a promise only when one of them returned one, so an event
 * no listener waits on costs no promise.
 */
export function everyListener (listeners: Array<(event: BridgeEvent) => void | Promise<void>>): (event: BridgeEvent) => void | Promise<void> {
  return (event) => {
    let waits: Array<Promise<void>> | undefined
    for (const listener of listeners) {
      let result: void | Promise<void>
      try {
        result = listener(event)
      } catch (err) {
        // The others still see the event; the entry stays pending all the same.
        result = Promise.reject(err)
      }
      if (result !== undefined) (waits ??= []).push(result)
    }
    if (waits === undefined) return
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => {})
  }
}

export function bridgeEvent (queue: string, id: string, jobId: string, raw: string[]): BridgeEvent {
  const fields: Record<string, string> = {}
  for (let i = 0; i < raw.length; i += 2) fields[raw[i]] = raw[i + 1]
  const event = fields.event
  const out: BridgeEvent = { queue, jobId, event, id, t: Number(id.slice(0, id.indexOf('-'))), final: FINAL.has(event), fields }
  // The plugin's own `cancelled` entry says its attempt (lib/http/jobs/cancel.ts).
  const attempt = Number(fields.attempt)
  if (fields.attempt !== undefined && Number.isInteger(attempt) && attempt > 0) out.attempt = attempt
  return out
}
