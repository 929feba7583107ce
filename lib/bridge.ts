import type { FastifyBaseLogger } from 'fastify'
import type { Redis } from 'ioredis'
import type { Keys } from './keys'

/** BullMQ events that change what a watcher should see; the rest (added, drained ...) are skipped. */
const RELAYED = new Set(['progress', 'active', 'waiting', 'delayed', 'stalled', 'completed', 'failed', 'removed', 'cancelled'])

/** BullMQ's final events, plus the plugin's own `cancelled`. */
const FINAL = new Set(['completed', 'failed', 'cancelled'])

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

export interface BridgeOptions {
  /** Commands: PUBLISH, XACK, XAUTOCLAIM. */
  redis: Redis
  /** A dedicated connection for the blocking XREADGROUP. */
  blocking: Redis
  keys: Keys
  queues: string[]
  group: string
  consumer: string
  blockMs: number
  claimIdleMs: number
  claimIntervalMs: number
  /** A consumer with nothing pending and idle this long is a dead instance's leftover. */
  consumerIdleMs: number
  /** Also hands each published message to this instance's own subscribers. */
  local?: (channel: string, payload: string) => void
  /**
   * Called with every relayed event after it was published (once across the cluster in normal
   * operation, again after a takeover). Errors thrown here are logged, never block the relay.
   */
  onEvent?: (event: BridgeEvent) => void
  log: FastifyBaseLogger
}

type Entry = [id: string, fields: string[]]

/**
 * Reads each queue's BullMQ event stream ONCE across the cluster, through a consumer group all
 * instances share, and publishes every relevant event to its job's own channel. An entry is
 * acknowledged only after it was published; entries a dead instance took but never acknowledged
 * are claimed by the others after `claimIdleMs`, so a SIGKILL loses no final state.
 */
export class Bridge {
  readonly #o: BridgeOptions
  readonly #streams: string[]
  #running = false
  #loop: Promise<void> | null = null
  /** Settles when close() starts, so the read loop never waits on a read that cannot end. */
  #stopped: Promise<null>
  #stop!: () => void
  #claimTimer: NodeJS.Timeout | null = null
  #lastSweep = Date.now()
  /** Events published since start (for tests and metrics). */
  published = 0

  constructor (opts: BridgeOptions) {
    this.#o = opts
    this.#streams = opts.queues.map(q => opts.keys.queueKey(q, 'events'))
    this.#stopped = new Promise(resolve => { this.#stop = () => resolve(null) })
  }

  async start (): Promise<void> {
    this.#running = true
    await this.#ensureGroups().catch((err: Error) => this.#o.log.warn({ err }, 'job-progress: cannot create the bridge consumer group yet; will retry'))
    this.#loop = this.#read()
    this.#claimTimer = setInterval(() => { void this.#claim() }, this.#o.claimIntervalMs).unref()
  }

  async #ensureGroups (): Promise<void> {
    for (const stream of this.#streams) {
      try {
        // '$': the group starts at the stream's end; MKSTREAM: before the first job ever ran.
        await this.#o.redis.xgroup('CREATE', stream, this.#o.group, '$', 'MKSTREAM')
      } catch (err) {
        if (!String((err as Error).message).includes('BUSYGROUP')) throw err
      }
    }
  }

  async #read (): Promise<void> {
    const { blocking, group, consumer, blockMs } = this.#o
    const args = [...this.#streams, ...this.#streams.map(() => '>')]
    let backoff = 100
    while (this.#running) {
      try {
        const read = blocking.xreadgroup('GROUP', group, consumer, 'COUNT', 500, 'BLOCK', blockMs, 'STREAMS', ...args) as Promise<Array<[string, Entry[]]> | null>
        // A read in flight when Redis dropped is kept for resending; disconnecting the client
        // while it waits to reconnect leaves that read pending for ever. close() races it.
        read.catch(() => {})
        const reply = await Promise.race([read, this.#stopped])
        backoff = 100
        if (reply !== null) await this.#publish(reply)
      } catch (err) {
        if (!this.#running) break
        const message = String((err as Error).message)
        // The stream or group vanished (Redis restarted empty, the queue was obliterated): make it again.
        if (message.includes('NOGROUP')) await this.#ensureGroups().catch(() => {})
        else this.#o.log.debug({ err }, 'job-progress: bridge read failed; retrying')
        await new Promise(resolve => setTimeout(resolve, backoff).unref())
        backoff = Math.min(backoff * 2, 2_000)
      }
    }
  }

  /** Takes over entries another consumer read but did not acknowledge within `claimIdleMs`. */
  async #claim (): Promise<void> {
    if (!this.#running || this.#o.redis.status !== 'ready') return
    const { redis, group, consumer, claimIdleMs } = this.#o
    try {
      for (const stream of this.#streams) {
        let cursor = '0-0'
        do {
          const [next, entries] = await redis.xautoclaim(stream, group, consumer, claimIdleMs, cursor, 'COUNT', 500) as [string, Entry[]]
          if (entries.length > 0) await this.#publish([[stream, entries.filter(e => e !== null && e[1] !== null)]])
          cursor = next
        } while (cursor !== '0-0' && this.#running)
      }
      if (Date.now() - this.#lastSweep > this.#o.consumerIdleMs) await this.#sweepConsumers()
    } catch (err) {
      this.#o.log.debug({ err }, 'job-progress: bridge claim failed; will retry')
    }
  }

  /**
   * An instance that died without closing stays listed in the group. Once its entries have been
   * claimed it holds nothing: drop it. Deleting a live but quiet consumer is harmless too, as its
   * next read makes it again.
   */
  async #sweepConsumers (): Promise<void> {
    this.#lastSweep = Date.now()
    for (const stream of this.#streams) {
      const consumers = await this.#o.redis.xinfo('CONSUMERS', stream, this.#o.group) as Array<Array<string | number>>
      for (const row of consumers) {
        const info: Record<string, string | number> = {}
        for (let i = 0; i < row.length; i += 2) info[row[i] as string] = row[i + 1]
        if (info.name !== this.#o.consumer && Number(info.pending) === 0 && Number(info.idle) > this.#o.consumerIdleMs) {
          await this.#o.redis.xgroup('DELCONSUMER', stream, this.#o.group, String(info.name))
        }
      }
    }
  }

  async #publish (streams: Array<[string, Entry[]]>): Promise<void> {
    const { redis, keys, group } = this.#o
    const pipe = redis.pipeline()
    const local: Array<[string, string]> = []
    const events: BridgeEvent[] = []
    for (const [stream, entries] of streams) {
      const queue = stream.slice(keys.prefix.length + 1, -':events'.length)
      const ids: string[] = []
      for (const [id, fields] of entries) {
        ids.push(id)
        const message = relayMessage(id, fields)
        if (message !== null) {
          const channel = keys.channel(queue, message.jobId)
          pipe.publish(channel, message.payload)
          local.push([channel, message.payload])
          this.published++
          if (this.#o.onEvent !== undefined) events.push(bridgeEvent(queue, id, message.jobId, fields))
        }
      }
      if (ids.length > 0) pipe.xack(stream, group, ...ids)
    }
    // Sent first, so the other instances are not kept waiting while this one serves its sockets.
    const sent = pipe.exec()
    if (this.#o.local !== undefined) for (const [channel, payload] of local) this.#o.local(channel, payload)
    await sent
    for (const event of events) {
      try {
        this.#o.onEvent?.(event)
      } catch (err) {
        this.#o.log.error({ err }, 'job-progress: a bridge event listener failed')
      }
    }
  }

  /** Stops reading so other instances take over; acknowledged work is never lost. */
  async close (): Promise<void> {
    this.#running = false
    this.#stop()
    if (this.#claimTimer !== null) clearInterval(this.#claimTimer)
    // The blocking read would hold close() for up to blockMs: cut it short.
    this.#o.blocking.disconnect()
    await this.#loop
    // Leave no dead consumer behind in the group, unless it still holds entries for others to claim.
    for (const stream of this.#streams) {
      try {
        const mine = await this.#o.redis.xpending(stream, this.#o.group, '-', '+', 1, this.#o.consumer) as unknown[]
        if (mine.length === 0) await this.#o.redis.xgroup('DELCONSUMER', stream, this.#o.group, this.#o.consumer)
      } catch {}
    }
  }
}

function bridgeEvent (queue: string, id: string, jobId: string, raw: string[]): BridgeEvent {
  const fields: Record<string, string> = {}
  for (let i = 0; i < raw.length; i += 2) fields[raw[i]] = raw[i + 1]
  const event = fields.event
  return { queue, jobId, event, id, t: Number(id.slice(0, id.indexOf('-'))), final: FINAL.has(event), fields }
}

/** Builds the small message for a job's channel from a stream entry, or null when it is not relayed. */
export function relayMessage (id: string, fields: string[]): { jobId: string, payload: string } | null {
  let event = ''
  let jobId = ''
  let data: string | null = null
  for (let i = 0; i < fields.length; i += 2) {
    const name = fields[i]
    if (name === 'event') event = fields[i + 1]
    else if (name === 'jobId') jobId = fields[i + 1]
    else if (name === 'data') data = fields[i + 1]
  }
  if (jobId === '' || !RELAYED.has(event)) return null
  const t = Number(id.slice(0, id.indexOf('-')))
  // The progress value is already JSON in the stream: splice it in instead of parsing it.
  const payload = event === 'progress' && data !== null
    ? `{"e":"progress","t":${t},"d":${data}}`
    : `{"e":"${event}","t":${t}}`
  return { jobId, payload }
}
