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
  return { queue, jobId, event, id, t: Number(id.slice(0, id.indexOf('-'))), final: FINAL.has(event), fields }
}
