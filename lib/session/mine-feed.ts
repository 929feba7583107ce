import type { ProtocolDefinition } from '../protocols/types'
import type { MyJobMessage, MyJobsResyncMessage } from '../wire/messages'
import type { Outbox } from './outbox'
import { serialize } from './render'

/** The caller's jobs feed: `watch` calls `receive` with each message until the returned stop. */
export interface MineContext {
  watch: (owner: string, receive: (message: MyJobMessage | MyJobsResyncMessage, raw: string) => void) => Promise<() => void>
}

/**
 * What a session does with each message of the caller's jobs feed: rendered by its protocol and
 * queued keyed per job, so a slow client gets each job's latest state; finals, creations and
 * resyncs are never replaced (a creation's `created` flag would be lost).
 */
export function mineReceiver (outbox: Outbox, render: NonNullable<ProtocolDefinition['mine']>): (message: MyJobMessage | MyJobsResyncMessage) => void {
  return (message) => {
    const data = serialize(render(message))
    if (data === undefined) return
    if (message.type === 'my_jobs_resync') outbox.send(data, '\u0001', true)
    else outbox.send(data, `\u0001${message.job_id}`, message.created === true || (message.status !== 'queued' && message.status !== 'running'))
  }
}
