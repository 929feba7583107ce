/**
 * Every Redis key and channel name the plugin and its workers use, in one place, so the API
 * side, the bridge and the worker helper cannot disagree.
 *
 * Keys the plugin keeps next to a job (its cancellation mark) live in the job's queue namespace,
 * `<prefix>:<queue>:...`, so they share the queue's cluster slot whenever BullMQ's keys do (a
 * hash-tagged prefix or queue name): one script or pipeline can then read them together. The
 * per-job channel is hash-tagged on the job id instead, so sharded pub/sub spreads the jobs of
 * one queue over every shard.
 */
export interface KeyOptions {
  /** BullMQ's key prefix. */
  prefix: string
  /** Prefix of the plugin's own channels. */
  channelPrefix: string
}

/** The job hash field that holds the owner alone, so ownership is one small read. */
export const OWNER_FIELD = 'jpOwner'

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

  /** BullMQ's lock of a job: present exactly while a worker holds it active. */
  lock (queue: string, jobId: string): string {
    return `${this.job(queue, jobId)}:lock`
  }

  /** A BullMQ list or set of a queue: `active`, `completed`, `failed`, `events` ... */
  queueKey (queue: string, name: string): string {
    return `${this.prefix}:${queue}:${name}`
  }

  /** The pub/sub channel of one job, hash-tagged on the job so sharded pub/sub spreads jobs over shards. */
  channel (queue: string, jobId: string): string {
    return `${this.channelPrefix}:${queue}:{${jobId}}`
  }

  /** Reads the queue and job back from a {@link channel} name. */
  static parseChannel (channel: string): { queue: string, jobId: string } | null {
    const close = channel.lastIndexOf('}')
    const open = channel.lastIndexOf(':{', close)
    if (open < 0 || close !== channel.length - 1) return null
    const start = channel.indexOf(':')
    if (start < 0 || start >= open) return null
    return { queue: channel.slice(start + 1, open), jobId: channel.slice(open + 2, close) }
  }

  /**
   * The cancellation mark of a job: holds its owner, outlives the job when a queued job is
   * removed (BullMQ removes the job hash and its own suffixes, not this one). In the queue's
   * namespace, so in its slot.
   */
  cancel (queue: string, jobId: string): string {
    return `${this.job(queue, jobId)}:jp-cancel`
  }

  /** BullMQ's list of a job's log lines (`job.log()`). */
  logs (queue: string, jobId: string): string {
    return `${this.job(queue, jobId)}:logs`
  }

  /**
   * A named stream of a job (list of chunks as JSON, the index is the offset) and its meta hash
   * (`bytes`, and `end`, `at`, `m` once ended). In the job's slot; each expires on its own, since
   * neither BullMQ's removal nor the cancel and delete scripts know them.
   */
  stream (queue: string, jobId: string, name: string): { chunks: string, meta: string } {
    const base = `${this.job(queue, jobId)}:jp-stream:${name}`
    return { chunks: base, meta: `${base}:meta` }
  }

  /** The mark a deleted job leaves for a while, so its worker stops at its next report. */
  deleted (queue: string, jobId: string): string {
    return this.queueKey(queue, `jp:deleted:${jobId}`)
  }

  /** The hash of a job's outputs (name → JSON). */
  outputs (queue: string, jobId: string): string {
    return this.queueKey(queue, `jp:outputs:${jobId}`)
  }

  /** The storage key of a job's upload, kept until its final state is recorded. */
  upload (queue: string, jobId: string): string {
    return this.queueKey(queue, 'jp:upload:' + jobId)
  }

  /** The uploads of a queue due for removal (sorted set, score = when). */
  uploadsDue (queue: string): string {
    return this.queueKey(queue, 'jp:uploads:due')
  }

  /** An `Idempotency-Key` remembered, under the hashed id of its owner and key. */
  idempotency (queue: string, id: string): string {
    return this.queueKey(queue, `jp:idem:${id}`)
  }

  /** The quota counters of an owner (hashed id): jobs active now, and created in the current window. */
  quota (queue: string, id: string): { active: string, window: string } {
    return { active: this.queueKey(queue, `jp:quota:active:${id}`), window: this.queueKey(queue, `jp:quota:window:${id}`) }
  }

  /** An owner's index of jobs in a queue (`GET /jobs`). */
  ownerIndex (queue: string, owner: string): string {
    return this.queueKey(queue, `jp:owner:${owner}`)
  }

  /** The channel of an owner's job feed, by the owner's hashed tag: short, and spread over shards. */
  ownerChannel (tag: string): string {
    return `${this.channelPrefix}:owner:of:{${tag}}`
  }

  /** A job's webhook URL, when the upload named one. */
  webhookUrl (queue: string, jobId: string): string {
    return this.queueKey(queue, 'jp:webhook:' + jobId)
  }

  /** The throttle mark of a job's progress webhooks. */
  webhookProgress (queue: string, jobId: string): string {
    return this.queueKey(queue, 'jp:webhook-progress:' + jobId)
  }

  /**
   * The jobs the plugin cancelled (sorted set, score = when, Redis's clock; member
   * `<jobId>:<attempt>`): a cancelled job is in no BullMQ set, and a final lost to a stream gap
   * is recovered from here. Trimmed to the cancel mark's lifetime at every cancel.
   */
  cancelled (queue: string): string {
    return this.queueKey(queue, 'jp:cancelled')
  }

  /**
   * The jobs the plugin created (sorted set, score = when): a job that BullMQ removed before a
   * stream gap was repaired is found, and counted, from here. Trimmed like {@link cancelled}.
   */
  created (queue: string): string {
    return this.queueKey(queue, 'jp:created')
  }

  /**
   * The queue's record of stream gaps (hash): the deficit already claimed, the last entry id the
   * group was known to have read, and each claimed window still to recover with its cursor.
   */
  finalGaps (queue: string): string {
    return this.queueKey(queue, 'jp:gaps')
  }

  /** Who recovers a queue's gap windows now (a lease, with an expiry). */
  finalGapsLease (queue: string): string {
    return this.queueKey(queue, 'jp:gaps:lease')
  }

  /** The instances alive (sorted set, score = last heartbeat), for the connection limit. */
  instances (): string {
    return `${this.channelPrefix}:instances`
  }

  /**
   * An owner's open connections (hash: connection id → the instance holding it), hash-tagged on
   * the owner. Earlier versions counted per instance under `<channelPrefix>:conns:{<owner>}`.
   */
  connections (owner: string): string {
    return `${this.channelPrefix}:conn-ids:{${owner}}`
  }

  /** How many of {@link connections} each instance holds (hash: instance → count), in the same slot. */
  connectionCounts (owner: string): string {
    return `${this.channelPrefix}:conn-n:{${owner}}`
  }
}

/**
 * On a Redis Cluster BullMQ runs multi-key scripts over a queue's keys, so they must share one
 * slot: the prefix or each queue name must carry a hash tag. Null when they do, else what to write.
 */
export function clusterKeyProblem (prefix: string, queues: string[]): string | null {
  const tag = (key: string): string | null => {
    const open = key.indexOf('{')
    const close = open < 0 ? -1 : key.indexOf('}', open + 1)
    return close > open + 1 ? key.slice(open + 1, close) : null
  }
  const bad = queues.filter(queue => tag(`${prefix}:${queue}:`) === null)
  if (bad.length === 0) return null
  return `on a Redis Cluster every key of a BullMQ queue must be in one slot, but prefix "${prefix}" and queue ${bad.map(q => `"${q}"`).join(', ')} carry no hash tag: ` +
    `set \`prefix: '{${prefix.replace(/[{}]/g, '')}}'\` (and the same prefix in your workers), or hash-tag each queue name (\`queueName: '{${bad[0]}}'\`)`
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** Job ids are random UUIDs; anything else cannot be a job of ours and is answered as "not found". */
export function isJobId (value: unknown): value is string {
  return typeof value === 'string' && UUID.test(value)
}
