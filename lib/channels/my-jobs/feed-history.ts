import { randomBytes } from 'node:crypto'
import type { MyJobMessage, MyJobsResyncMessage } from '../../wire/messages'

export type FeedMessage = MyJobMessage | MyJobsResyncMessage

/** Messages kept per owner's channel for a stream that comes back. */
const KEEP = 100

interface Kept {
  /** Every message after this number is in `entries`. */
  from: number
  entries: Array<[number, FeedMessage]>
}

/**
 * What this instance passed on lately on each owner's channel it follows, numbered, so that an
 * SSE stream of the feed that comes back (an EventSource sends the last id it saw as
 * `Last-Event-ID`) gets exactly what it missed instead of nothing.
 *
 * An id is `<instance tag>.<number>`: one counter for the whole instance, so an id names a moment
 * on any channel. Only the instance that numbered a message can resume after it, and only while
 * it still follows the channel and keeps everything after that moment: a stream that comes back
 * to another instance, to a restarted one, or too late, cannot resume, and is told to read its
 * list again. Nothing is written to Redis for this.
 */
export class FeedHistory {
  readonly #tag = randomBytes(6).toString('base64url')
  #seq = 0
  readonly #kept = new Map<string, Kept>()
  /** The id each message got; the same object goes to every follower of the channel. */
  readonly #ids = new WeakMap<FeedMessage, string>()

  /** The channel is followed from now on: what it carries from here is kept. */
  open (channel: string): void {
    this.#kept.set(channel, { from: this.#seq, entries: [] })
  }

  /** The channel is no longer followed: what it carries from now on is not seen. */
  close (channel: string): void {
    this.#kept.delete(channel)
  }

  /** A message passed on to the channel's followers: numbered, and kept. */
  record (channel: string, message: FeedMessage): void {
    const n = ++this.#seq
    this.#ids.set(message, `${this.#tag}.${n}`)
    const kept = this.#kept.get(channel)
    if (kept === undefined) return
    kept.entries.push([n, message])
    if (kept.entries.length > KEEP) kept.from = (kept.entries.shift() as [number, FeedMessage])[0]
  }

  /** The id of a message passed on. */
  idOf (message: FeedMessage): string | undefined {
    return this.#ids.get(message)
  }

  /** The id of this moment: a stream that saw it resumes after it. */
  now (): string {
    return `${this.#tag}.${this.#seq}`
  }

  /** The messages after `lastId` on the channel, or null when this instance cannot know them all. */
  since (channel: string, lastId: string): FeedMessage[] | null {
    const dot = lastId.lastIndexOf('.')
    const n = Number(lastId.slice(dot + 1))
    const kept = this.#kept.get(channel)
    if (kept === undefined || lastId.slice(0, dot) !== this.#tag || !Number.isSafeInteger(n) || n < kept.from || n > this.#seq) return null
    return kept.entries.filter(([seq]) => seq > n).map(([, message]) => message)
  }
}
