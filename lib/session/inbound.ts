/**
 * What one connection may make the server do from what it sends (`inbound` option). The outbox
 * bounds what waits to be sent; this bounds the work a client's own messages queue: a client that
 * sends subscribes faster than Redis answers them, and reads no reply, would otherwise hold a
 * pending step, a closure and a Redis command for every message it ever sent.
 */
export interface InboundOptions {
  /** Actions (subscribe, unsubscribe, the jobs feed) asked for and not yet answered. @default 256 */
  maxInFlight: number
  /** Messages per second a connection may send on average (a token bucket's refill). @default 50 */
  messagesPerSecond: number
  /** Messages a connection may send at once, above the average (the bucket's size). @default 256 */
  burst: number
}

/** The defaults, spelled once: 100 subscriptions at once (a dashboard) fit in both the burst and the actions in flight. */
export const INBOUND_DEFAULTS: Readonly<InboundOptions> = { maxInFlight: 256, messagesPerSecond: 50, burst: 256 }

/**
 * One connection's counters: a token bucket for its message rate and a count of its actions in
 * flight. Three numbers, made with the session: most connections send a handful of messages.
 */
export class InboundLimit {
  readonly #opts: InboundOptions
  #tokens: number
  #at: number
  #inFlight = 0

  constructor (opts: InboundOptions, now = Date.now()) {
    this.#opts = opts
    this.#tokens = opts.burst
    this.#at = now
  }

  get inFlight (): number {
    return this.#inFlight
  }

  /** Takes one message from the bucket: the reason to close when the client sends too fast, else null. */
  message (now = Date.now()): string | null {
    const { burst, messagesPerSecond } = this.#opts
    if (now > this.#at) {
      this.#tokens = Math.min(burst, this.#tokens + (now - this.#at) * messagesPerSecond / 1000)
      this.#at = now
    }
    if (this.#tokens < 1) return `too many messages: at most ${messagesPerSecond} per second, ${burst} at once`
    this.#tokens--
    return null
  }

  /** Counts an action in flight until {@link end}: the reason to close when too many wait, else null. */
  begin (): string | null {
    if (this.#inFlight >= this.#opts.maxInFlight) return `too many requests waiting for an answer: at most ${this.#opts.maxInFlight}`
    this.#inFlight++
    return null
  }

  /** An action counted by {@link begin} was answered (or failed). */
  end (): void {
    this.#inFlight--
  }
}
