import { noTelemetry } from '../core/telemetry'
import type { Commands } from '../core/snapshot'
import { relayMessage } from '../wire/relay'
import type { Batch, BatchDelivery } from './batch-delivery'
import { bridgeEvent } from './bridge-event'
import type { BridgeOptions } from './bridge-options'
import { queueOf, READ_COUNT, type ConsumerGroups, type Entry } from './consumer-groups'
import { RELAY_SCRIPT } from './relay-script'
import type { Running } from './run-state'
import { corkOf } from './stream-reader'

/** The relay script's reply: entries read, messages published, entries handed back, the last id read ('' for none). */
type Relayed = [read: number, published: number, back: Entry[], last?: string]

/**
 * Under load, how long the relay waits after a round that read several entries before it reads
 * again, so that the next round takes what arrived meanwhile in one run. A round costs Redis the
 * wake-up, the script, its read, its XACK and a move of the wake group whatever it reads; read one
 * entry at a time, that is five commands per event, in a batch of ten about 1.4. A round that
 * read one entry or none is not followed by a pause: an isolated event leaves at once.
 */
export const RELAY_PAUSE_MS = 2

/** Settles a wait on a promise whether it resolved or rejected (its failure is kept elsewhere). */
const settled = (): true => true

const pause = async (): Promise<void> => await new Promise(resolve => setTimeout(resolve, RELAY_PAUSE_MS))

type Options = Pick<BridgeOptions, 'redis' | 'blocking' | 'keys' | 'group' | 'consumer' | 'blockMs' | 'progressListeners' | 'onEvent' | 'telemetry' | 'log'>
type Groups = Pick<ConsumerGroups, 'ensure' | 'wakeGroup' | 'floor'>
type Delivery = Pick<BatchDelivery, 'handOff' | 'settle' | 'track'>

/**
 * The ordered relay (lib/bridge/relay-script.ts): the script reads and publishes in Redis, so
 * every job's messages leave Redis in stream order; this side wakes it, and hands the lifecycle
 * entries it gives back to the listeners.
 */
export class OrderedRelay {
  readonly #o: Options
  readonly #run: Running
  readonly #groups: Groups
  readonly #delivery: Delivery
  /** Per stream: the relay script's arguments, the same on every run. */
  readonly #relayArgsOf = new Map<string, Array<string | number>>()
  #published = 0

  constructor (opts: Options, run: Running, groups: Groups, delivery: Delivery) {
    this.#o = opts
    this.#run = run
    this.#groups = groups
    this.#delivery = delivery
  }

  /** Events the script published since start (for tests and metrics). */
  get published (): number {
    return this.#published
  }

  /** Teaches both connections the script. */
  define (): void {
    for (const r of [this.#o.blocking, this.#o.redis]) r.defineCommand('jpRelay', { numberOfKeys: 1, lua: RELAY_SCRIPT })
  }

  /**
   * The ordered relay's loop: a blocking read of the wake group, which returns when the next entry
   * arrives (at once when a script left entries unread), and behind it, in the same write, the
   * relay script on each stream (it reads, publishes and acknowledges progress in Redis, and hands
   * back the lifecycle entries for the listeners). Redis keeps a blocked client's next commands
   * until the read returns, then runs them at once: an entry is published the moment it arrives,
   * without a round trip through this process, and the wake-up's reply and the scripts' come back
   * in one read. Nothing is published from here, so there is no local hand-off either: this
   * instance's hub gets every message from its subscriber, in the order Redis published them.
   */
  async run (streams: string[]): Promise<void> {
    const { blocking, consumer, blockMs } = this.#o
    const wake = this.#groups.wakeGroup
    const wakeArgs = ['GROUP', wake, consumer, 'COUNT', 1, 'NOACK', 'BLOCK', blockMs, 'STREAMS', ...streams, ...streams.map(() => '>')]
    let backoff = 100
    let failures = 0
    // At start and after a failure, entries may wait that no wake-up will announce: the scripts
    // also run before the read.
    let catchUp = true
    // What failed in the current round; its callbacks are made once, not per round.
    let failed: Error | null = null
    // Entries the current round's scripts read.
    let read = 0
    const onWakeUpError = (err: Error): void => { failed ??= err }
    const onScript = streams.map(stream => (err: Error | null | undefined, reply: Relayed): void => {
      if (err != null) {
        failed ??= err
      } else {
        read += reply[0]
        this.#relayed(stream, reply)
      }
    })
    while (this.#run.running) {
      try {
        // A round that read several entries says events come faster than a round trip: wait a
        // little, so that the next round takes those that arrive meanwhile in one run. Order
        // is the script's, unchanged; the entries wait in the stream, pending for nobody.
        if (read > 1 && await this.#run.unlessStopped(pause()) === null) break
        read = 0
        // Plain commands on a corked socket (one write), not a pipeline: see StreamReader's
        // publishAndRead. Each script's reply is taken as it arrives: the lifecycle entries it
        // handed back reach the listeners at once.
        failed = null
        let last: Promise<unknown> = Promise.resolve()
        const socket = corkOf(blocking)
        try {
          if (catchUp) for (let i = 0; i < streams.length; i++) this.#relayArgs(blocking, streams[i], onScript[i])
          // Its reply says nothing the scripts after it do not: only its failure is kept.
          blocking.call('XREADGROUP', ...wakeArgs).catch(onWakeUpError)
          for (let i = 0; i < streams.length; i++) last = this.#relayArgs(blocking, streams[i], onScript[i])
        } finally {
          socket?.uncork()
        }
        // Replies come in order: every callback has run when the last script's reply is here.
        if (await this.#run.unlessStopped(last.then(settled, settled)) === null) break
        if (failed !== null) throw failed
        catchUp = false
        backoff = 100
        failures = 0
      } catch (err) {
        if (!this.#run.running) break
        catchUp = true
        const message = String((err as Error).message)
        if (message.includes('NOGROUP')) {
          await this.#groups.ensure(true).catch(() => {})
        } else if (++failures === 5) {
          // A Redis that refuses the script (an ACL without scripting) would otherwise stop the relay silently.
          this.#o.log.warn({ err }, 'job-progress: the bridge cannot relay events (5 attempts in a row failed); retrying')
        } else {
          this.#o.log.debug({ err }, 'job-progress: bridge relay failed; retrying')
        }
        await new Promise(resolve => setTimeout(resolve, backoff).unref())
        backoff = Math.min(backoff * 2, 2_000)
      }
    }
  }

  /** Sends the relay script's run on one stream (on a connection or in a pipeline); `done` gets its reply. On a connection, returns the command's promise. */
  #relayArgs (pipe: Commands | ReturnType<Commands['pipeline']>, stream: string, done: (err: Error | null | undefined, reply: Relayed) => void): Promise<unknown> {
    let args = this.#relayArgsOf.get(stream)
    if (args === undefined) {
      const { group, consumer, keys } = this.#o
      const all = this.#o.progressListeners !== false && this.#o.onEvent !== undefined ? '1' : '0'
      // A job's channel is <head><jobId><tail>.
      const probe = keys.channel(queueOf(keys.prefix, stream), '\u0000')
      const at = probe.indexOf('\u0000')
      args = [stream, group, consumer, READ_COUNT, this.#groups.wakeGroup, probe.slice(0, at), probe.slice(at + 1), all]
      this.#relayArgsOf.set(stream, args)
    }
    return (pipe as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>).jpRelay(...args, done)
  }

  /**
   * Runs the relay script on a stream until it read less than a full batch (at most 20 runs):
   * for the periodic check and close(), on the command connection.
   */
  async relayNow (stream: string): Promise<void> {
    for (let runs = 0; runs < 20; runs++) {
      const pipe = this.#o.redis.pipeline()
      let reply: Relayed | null = null
      this.#relayArgs(pipe, stream, (err, r) => { if (err == null) reply = r })
      const [[err]] = await pipe.exec() as Array<[Error | null, unknown]>
      if (err !== null) throw err
      if (reply === null) return
      this.#relayed(stream, reply)
      if ((reply as Relayed)[0] < READ_COUNT) return
    }
  }

  /** What one run of the relay script did: the entries it handed back go to the listeners, then are acknowledged. */
  #relayed (stream: string, [, published, back, last]: Relayed): void {
    if (last !== undefined && last !== '') this.#groups.floor.note(stream, last)
    this.#published += published
    ;(this.#o.telemetry ?? noTelemetry).count('bridgePublished', {}, published)
    if (back.length === 0) return
    const queue = queueOf(this.#o.keys.prefix, stream)
    const batch: Batch = { messages: [], events: [], done: [[stream, back.map(([id]) => id)]], waits: null, failed: null }
    for (const [id, fields] of back) {
      const message = relayMessage(id, fields)
      if (message !== null) batch.events.push(bridgeEvent(queue, id, message.jobId, fields))
    }
    this.#delivery.handOff(batch)
    this.#delivery.track(this.#delivery.settle(batch))
  }
}
