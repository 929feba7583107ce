/**
 * Every Redis key and channel name the plugin and its workers use, in one place, so the API
 * side, the bridge and the worker helper cannot disagree.
 */
export interface KeyOptions {
  /** BullMQ's key prefix. */
  prefix: string
  /** Prefix of the plugin's own keys and channels. */
  channelPrefix: string
}

export class Keys {
  readonly prefix: string
  readonly channelPrefix: string

  constructor ({ prefix, channelPrefix }: KeyOptions) {
    this.prefix = prefix
    this.channelPrefix = channelPrefix
  }

  /** BullMQ's hash of one job. */
  job (queue: string, jobId: string): string {
    return `${this.prefix}:${queue}:${jobId}`
  }

  /** A BullMQ list or set of a queue: `active`, `completed`, `failed`, `events` ... */
  queueKey (queue: string, name: string): string {
    return `${this.prefix}:${queue}:${name}`
  }

  /** The pub/sub channel of one job; the braces keep a queue's names in one cluster slot. */
  channel (queue: string, jobId: string): string {
    return `${this.channelPrefix}:{${queue}}:${jobId}`
  }

  /** Pattern that matches {@link channel} names, to read the queue and job back. */
  static parseChannel (channel: string): { queue: string, jobId: string } | null {
    const open = channel.indexOf(':{')
    const close = channel.indexOf('}:', open)
    if (open < 0 || close < 0) return null
    return { queue: channel.slice(open + 2, close), jobId: channel.slice(close + 2) }
  }

  /** The cancellation mark of a job: holds its owner, outlives the job when a queued job is removed. */
  cancel (queue: string, jobId: string): string {
    return `${this.channelPrefix}:cancel:{${queue}}:${jobId}`
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** Job ids are random UUIDs; anything else cannot be a job of ours and is answered as "not found". */
export function isJobId (value: unknown): value is string {
  return typeof value === 'string' && UUID.test(value)
}
