import type { WebSocket } from 'ws'

/** Messages are text frames; a Buffer is sent as text too (rendered once, shared by sockets). */
export type OutboxData = string | Buffer

interface Pending {
  data: OutboxData
  final: boolean
}

const TEXT = { binary: false } as const

/**
 * What a socket still has to send. While the socket keeps up, a message is written at once. When
 * it falls behind (more than `highWaterMark` bytes not yet handed to the kernel), messages wait
 * here, and a newer progress message for a job replaces the older one still waiting (conflation):
 * a slow client gets the latest state, not a backlog. Final and control messages are never
 * replaced or dropped.
 */
export class Outbox {
  readonly #ws: WebSocket
  readonly #highWaterMark: number
  readonly #queue = new Map<string, Pending>()
  /** Sends not yet flushed to the kernel, and since when none of them has been. */
  #inFlight = 0
  #waitingSince = 0
  #seq = 0
  #closeAfter: [number, string] | null = null
  /** Messages replaced before they were sent (for tests and metrics). */
  conflated = 0

  constructor (ws: WebSocket, highWaterMark = 16 * 1024) {
    this.#ws = ws
    this.#highWaterMark = highWaterMark
  }

  /**
   * Sends `data`. With a `key` (a job id) a later non-final message for the same key replaces
   * this one while both wait; without a key the message is never replaced.
   */
  send (data: OutboxData, key?: string, final = false): void {
    if (this.#ws.readyState !== 1 || this.#closeAfter !== null) return
    if (this.#queue.size === 0 && this.#ws.bufferedAmount < this.#highWaterMark) {
      this.#write(data)
      return
    }
    if (key === undefined) {
      this.#queue.set(`\0${this.#seq++}`, { data, final: true })
      return
    }
    const waiting = this.#queue.get(key)
    if (waiting === undefined || !waiting.final) {
      if (waiting !== undefined) {
        this.conflated++
        // The newer message goes to the back: it must not overtake control messages queued
        // after the one it replaces (an `unsubscribed`, a `subscribed` again).
        this.#queue.delete(key)
      }
      this.#queue.set(key, { data, final })
    } else {
      this.#queue.set(`${key}\0${this.#seq++}`, { data, final })
    }
  }

  /** Closes the socket once everything queued before this call is written. */
  closeWhenFlushed (code: number, reason: string): void {
    if (this.#closeAfter !== null) return
    this.#closeAfter = [code, reason]
    this.#drain()
  }

  /** How long sends have waited without any of them being flushed, in ms (0 when none waits). */
  stalledFor (now: number): number {
    return this.#inFlight === 0 ? 0 : now - this.#waitingSince
  }

  #write (data: OutboxData): void {
    if (this.#inFlight++ === 0) this.#waitingSince = Date.now()
    this.#ws.send(data, TEXT, this.#flushed)
  }

  // One bound callback for every send: no closure per message on the hot path.
  readonly #flushed = (err?: Error | null): void => {
    this.#inFlight--
    this.#waitingSince = this.#inFlight === 0 ? 0 : Date.now()
    if (err == null && (this.#queue.size > 0 || this.#closeAfter !== null)) this.#drain()
  }

  #drain (): void {
    if (this.#ws.readyState !== 1) return
    for (const [key, pending] of this.#queue) {
      if (this.#ws.bufferedAmount >= this.#highWaterMark) return
      this.#queue.delete(key)
      this.#write(pending.data)
    }
    if (this.#closeAfter !== null) this.#ws.close(...this.#closeAfter)
  }
}
