import type { OutboxData, Transport } from './transport'

export type { OutboxData }

interface Pending {
  data: OutboxData
  final: boolean
  bytes: number
}

const size = (data: OutboxData): number => typeof data === 'string' ? Buffer.byteLength(data) : data.byteLength

/** Who is told when the client counts as not reading: an object with a method (a session passes itself, not a closure made for it). */
export interface OutboxOwner {
  overflowed: () => void
  /** A send is in flight again after none was: until it is flushed, the client may be stalled. */
  sending?: () => void
}

export interface OutboxOptions {
  /** Bytes not yet flushed above which messages wait here. @default 16384 */
  highWaterMark?: number
  /**
   * Bytes waiting here (behind the transport's unflushed ones) above which the client counts as
   * not reading: `owner.overflowed()` runs and nothing more is queued. @default Infinity
   */
  maxBytes?: number
  owner?: OutboxOwner
}

const nobody: OutboxOwner = { overflowed () {} }

/**
 * What a connection still has to send. While the client keeps up, a message is written at once.
 * When it falls behind (more than `highWaterMark` bytes not yet handed to the kernel), messages
 * wait here, and a newer progress message for a job replaces the older one still waiting
 * (conflation): a slow client gets the latest state, not a backlog. Final and control messages
 * are never replaced or dropped, so they count against `maxBytes`: a client that asks for
 * answers and never reads them is cut off instead of growing the server.
 */
export class Outbox {
  readonly #transport: Transport
  readonly #highWaterMark: number
  readonly #maxBytes: number
  readonly #owner: OutboxOwner
  /** Made when a message first has to wait: most connections never fall behind. */
  #queue: Map<string, Pending> | null = null
  #queuedBytes = 0
  /** Sends not yet flushed to the kernel, and since when none of them has been. */
  #inFlight = 0
  #waitingSince = 0
  #seq = 0
  #closeAfter: [number, string] | null = null
  #overflowed = false
  /** Messages replaced before they were sent (for tests and metrics). */
  conflated = 0
  /** Runs when a send is flushed (or failed): one function for every send, no closure per message. */
  readonly #flushed: (err?: Error | null) => void

  constructor (transport: Transport, opts: OutboxOptions = {}) {
    this.#transport = transport
    this.#highWaterMark = opts.highWaterMark ?? 16 * 1024
    this.#maxBytes = opts.maxBytes ?? Infinity
    this.#owner = opts.owner ?? nobody
    // Made here, not as a field initialiser: some compilers give such a function its name at run
    // time, which gives it a property table of its own (about 250 bytes for each connection).
    this.#flushed = (err) => this.#onFlushed(err)
  }

  /** Bytes waiting here, not yet handed to the transport. */
  get queuedBytes (): number {
    return this.#queuedBytes
  }

  /**
   * Sends `data`. With a `key` (a job id) a later non-final message for the same key replaces
   * this one while both wait; without a key the message is never replaced.
   */
  send (data: OutboxData, key?: string, final = false): void {
    if (!this.#transport.open || this.#closeAfter !== null || this.#overflowed) return
    if ((this.#queue === null || this.#queue.size === 0) && this.#transport.bufferedAmount < this.#highWaterMark) {
      this.#write(data)
      return
    }
    const bytes = size(data)
    if (key === undefined) {
      this.#add(`\0${this.#seq++}`, { data, final: true, bytes })
    } else {
      const waiting = this.#queue?.get(key)
      if (waiting === undefined || !waiting.final) {
        if (waiting !== undefined) {
          this.conflated++
          // The newer message goes to the back: it must not overtake control messages queued
          // after the one it replaces (an `unsubscribed`, a `subscribed` again).
          this.#queue?.delete(key)
          this.#queuedBytes -= waiting.bytes
        }
        this.#add(key, { data, final, bytes })
      } else {
        this.#add(`${key}\0${this.#seq++}`, { data, final, bytes })
      }
    }
    // What waits here, not what the transport holds: a write goes out only below the high-water
    // mark, so the transport holds at most that and one message however large, and a big result
    // still flushing to a client that reads says nothing about whether it reads.
    if (this.#queuedBytes > this.#maxBytes) {
      this.#overflowed = true
      // Nothing queued will ever be read: let it go now, not when the connection is reaped.
      this.#queue = null
      this.#queuedBytes = 0
      this.#owner.overflowed()
    }
  }

  /** Closes the connection once everything queued before this call is written. */
  closeWhenFlushed (code: number, reason: string): void {
    if (this.#closeAfter !== null) return
    this.#closeAfter = [code, reason]
    this.#drain()
  }

  /** How long sends have waited without any of them being flushed, in ms (0 when none waits). */
  stalledFor (now: number): number {
    return this.#inFlight === 0 ? 0 : now - this.#waitingSince
  }

  #add (key: string, pending: Pending): void {
    (this.#queue ??= new Map()).set(key, pending)
    this.#queuedBytes += pending.bytes
  }

  #write (data: OutboxData): void {
    if (this.#inFlight++ === 0) {
      this.#waitingSince = Date.now()
      this.#owner.sending?.()
    }
    this.#transport.write(data, this.#flushed)
  }

  #onFlushed (err?: Error | null): void {
    this.#inFlight--
    this.#waitingSince = this.#inFlight === 0 ? 0 : Date.now()
    if (err == null && ((this.#queue !== null && this.#queue.size > 0) || this.#closeAfter !== null)) this.#drain()
  }

  #drain (): void {
    if (!this.#transport.open) return
    const queue = this.#queue
    if (queue !== null) {
      for (const [key, pending] of queue) {
        if (this.#transport.bufferedAmount >= this.#highWaterMark) return
        queue.delete(key)
        this.#queuedBytes -= pending.bytes
        this.#write(pending.data)
      }
      // Emptied: a connection that caught up holds no map while it is idle again.
      if (this.#queue === queue) this.#queue = null
    }
    if (this.#closeAfter !== null) this.#transport.close(...this.#closeAfter)
  }
}
