/**
 * The sets the instance's sweeps visit (lib/session/timers.ts), of any kind of session: a
 * session registers itself through its context, which names no session type (the session's
 * file imports this one, not the other way round).
 */

/** Buckets the sessions are spread over; a sweep's tick visits one or more of them. */
export const BUCKETS = 100

/**
 * Sessions, each also kept in one of {@link BUCKETS} buckets (in turn as they open), so that a
 * sweep can visit a bucket per tick without walking the whole set. A session's bucket never
 * changes: it is visited at the same place of every round, once per period, however many
 * sessions come and go. No iterator is held from one tick to the next (a live iterator of a set
 * keeps what was deleted from it reachable until it moves on).
 */
export class BucketSet<S extends object> extends Set<S> {
  readonly #buckets = Array.from({ length: BUCKETS }, () => new Set<S>())
  readonly #bucketOf = new WeakMap<S, Set<S>>()
  #next = 0

  override add (session: S): this {
    if (!this.has(session)) {
      const bucket = this.#buckets[this.#next++ % BUCKETS]
      bucket.add(session)
      this.#bucketOf.set(session, bucket)
    }
    return super.add(session)
  }

  override delete (session: S): boolean {
    this.#bucketOf.get(session)?.delete(session)
    return super.delete(session)
  }

  override clear (): void {
    for (const bucket of this.#buckets) bucket.clear()
    super.clear()
  }

  /** The sessions of bucket `i` (0 ≤ i < BUCKETS). */
  bucket (i: number): ReadonlySet<S> {
    return this.#buckets[i]
  }
}

/**
 * The instance's sessions, and two smaller sets the checks at most a second apart visit instead
 * of all of them: the sessions with a send in flight (a send stalled past `sendTimeoutMs`), and
 * those whose credential expires. An idle socket is in neither most of the time: at 100,000
 * sockets, visiting each every second cost more than pinging them.
 */
export class SessionRegistry<S extends object> extends BucketSet<S> {
  /** With a send in flight since they were last checked; a check lets go of those flushed since. */
  readonly busy = new Set<S>()
  /** Whose credential expires (a session's `maxAgeSeconds`, a watch token). */
  readonly expiring = new BucketSet<S>()

  /** From a session's outbox: a send is in flight again. */
  sending (session: S): void {
    if (this.has(session)) this.busy.add(session)
  }

  /** From a session: authenticated with a credential that expires. */
  expires (session: S): void {
    if (this.has(session)) this.expiring.add(session)
  }

  override delete (session: S): boolean {
    this.busy.delete(session)
    this.expiring.delete(session)
    return super.delete(session)
  }

  override clear (): void {
    this.busy.clear()
    this.expiring.clear()
    super.clear()
  }
}
