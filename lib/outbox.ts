import type { WebSocket } from 'ws'

interface Pending {
  data: string
  final: boolean
}

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
  /** When each send not yet flushed to the kernel was made, oldest first. */
  readonly #unflushed: number[] = []
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
  send (data: string, key?: string, final = false): void {
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

  /** How long the oldest unflushed send has waited, in ms (0 when the socket keeps up). */
  stalledFor (now: number): number {
    return this.#unflushed.length === 0 ? 0 : now - this.#unflushed[0]
  }

  #write (data: string): void {
    this.#unflushed.push(Date.now())
    this.#ws.send(data, (err) => {
      this.#unflushed.shift()
      if (err == null) this.#drain()
    })
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
