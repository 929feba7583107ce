import type { OutboxData, Transport } from './session/transport'

export type { OutboxData }

interface Pending {
  data: OutboxData
  final: boolean
  bytes: number
}

const size = (data: OutboxData): number => typeof data === 'string' ? Buffer.byteLength(data) : data.byteLength

export interface OutboxOptions {
  /** Bytes not yet flushed above which messages wait here. @default 16384 */
  highWaterMark?: number
  /**
   * Bytes waiting here plus those not yet flushed above which the client counts as not reading:
   * `onOverflow` runs and nothing more is queued. @default Infinity
   */
  maxBytes?: number
  onOverflow?: () => void
}

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
  readonly #onOverflow: () => void
  readonly #queue = new Map<string, Pending>()
  #queuedBytes = 0
  /** Sends not yet flushed to the kernel, and since when none of them has been. */
  #inFlight = 0
  #waitingSince = 0
  #seq = 0
  #closeAfter: [number, string] | null = null
  #overflowed = false
  /** Messages replaced before they were sent (for tests and metrics). */
  conflated = 0

  constructor (transport: Transport, opts: OutboxOptions = {}) {
    this.#transport = transport
    this.#highWaterMark = opts.highWaterMark ?? 16 * 1024
    this.#maxBytes = opts.maxBytes ?? Infinity
    this.#onOverflow = opts.onOverflow ?? (() => {})
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
    if (this.#queue.size === 0 && this.#transport.bufferedAmount < this.#highWaterMark) {
      this.#write(data)
      return
    }
    const bytes = size(data)
    if (key === undefined) {
      this.#add(`\0${this.#seq++}`, { data, final: true, bytes })
    } else {
      const waiting = this.#queue.get(key)
      if (waiting === undefined || !waiting.final) {
        if (waiting !== undefined) {
          this.conflated++
          // The newer message goes to the back: it must not overtake control messages queued
          // after the one it replaces (an `unsubscribed`, a `subscribed` again).
          this.#queue.delete(key)
          this.#queuedBytes -= waiting.bytes
        }
        this.#add(key, { data, final, bytes })
      } else {
        this.#add(`${key}\0${this.#seq++}`, { data, final, bytes })
      }
    }
    if (this.#queuedBytes + this.#transport.bufferedAmount > this.#maxBytes) {
      this.#overflowed = true
      // Nothing queued will ever be read: let it go now, not when the connection is reaped.
      this.#queue.clear()
      this.#queuedBytes = 0
      this.#onOverflow()
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
    this.#queue.set(key, pending)
    this.#queuedBytes += pending.bytes
  }

  #write (data: OutboxData): void {
    if (this.#inFlight++ === 0) this.#waitingSince = Date.now()
    this.#transport.write(data, this.#flushed)
  }

  // One bound callback for every send: no closure per message on the hot path.
  readonly #flushed = (err?: Error | null): void => {
    this.#inFlight--
    this.#waitingSince = this.#inFlight === 0 ? 0 : Date.now()
    if (err == null && (this.#queue.size > 0 || this.#closeAfter !== null)) this.#drain()
  }

  #drain (): void {
    if (!this.#transport.open) return
    for (const [key, pending] of this.#queue) {
      if (this.#transport.bufferedAmount >= this.#highWaterMark) return
      this.#queue.delete(key)
      this.#queuedBytes -= pending.bytes
      this.#write(pending.data)
    }
    if (this.#closeAfter !== null) this.#transport.close(...this.#closeAfter)
  }
}
