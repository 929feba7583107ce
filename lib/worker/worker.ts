import { UnrecoverableError, Worker, type Job, type WorkerOptions } from 'bullmq'
import { Redis as IORedis, type Redis, type RedisOptions } from 'ioredis'
import type { Readable } from 'node:stream'
import { appendLog, cutLine } from '../channels/logs/job-logs'
import { scriptRelay } from '../broker/create-broker'
import { Keys } from '../core/keys'
import { progressDetails, type Clipped, type ProgressDetails } from '../core/progress-details'
import { TRACEPARENT_FIELD } from '../core/tracing'
import { putOutput, type OutputFile } from '../core/outputs'
import { DiskStorage, type Storage } from '../core/storage'
import type { UploadJobData } from '../core/job-data'
import { jobTrace, noJobTrace } from './tracing'
import { jobStream, STREAM_LIMITS, type JobStream, type StreamLimits } from './stream'
import { AFTER_FORCE_MS, boundClose, closeTimeout, quitWithin } from '../core/bounded-close'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const NO_FILE: UploadJobData['file'] = { key: '', name: '', size: 0, type: '' }

/** Thrown by `report()` once the job was cancelled; BullMQ does not retry it. */
export class JobCancelledError extends UnrecoverableError {
  constructor () {
    super('cancelled')
    this.name = 'JobCancelledError'
  }
}

/** What a processor written with {@link createJobWorker} receives. */
export interface JobContext {
  job: Job<UploadJobData>
  /**
   * The uploaded file's name, size and type, and the form's text fields. A job created from JSON
   * without a file has `{ key: '', name: '', size: 0, type: '' }` here, and `open()` throws.
   */
  file: UploadJobData['file']
  fields: Record<string, string>
  /** The job's input when it was created from JSON (`POST <basePath>` or `enqueue`); `{}` for an upload. */
  data: Record<string, unknown>
  /** Opens the uploaded file from storage. */
  open: () => Readable
  /** A local path to the file, when the storage has one. */
  path: string | null
  /**
   * Reports progress (`{ processed, total }` on the job), with an optional `stage`, `message`
   * (cut to 1,024 characters) and small `data` (dropped over 4 KiB as JSON; the counts still go
   * through, and a warning says what was cut). Throws {@link JobCancelledError} when
   * the job was cancelled: let it propagate and the worker stops here.
   */
  report: (processed: number, total: number, details?: ProgressDetails) => Promise<void>
  /**
   * Appends a line to the job's log (BullMQ's `job.log()` list, trimmed to `keepLogs`), relays it
   * live to the watchers that asked for logs, and returns its offset: offsets are absolute,
   * counted in the job, so trimming never shifts them. A line over 8,192 characters is cut
   * (ending with ` [cut]`) and a warning says so.
   */
  log: (line: string) => Promise<number>
  /** Aborted once a report saw the job cancelled, or BullMQ cancelled it. */
  signal: AbortSignal
  /**
   * Stores an output file through the storage and lists it in the job's result; users download
   * it from `GET <basePath>/:jobId/outputs/<name>`. Names: letters, digits, `.`, `_`, `-`. A
   * second output of one name replaces the first. Throws {@link JobCancelledError} (and keeps
   * nothing) when the job was cancelled or deleted meanwhile.
   */
  putOutput: (name: string, source: Readable, type?: string) => Promise<OutputFile>
  /**
   * A named stream of the job (model tokens, rows ...): `write(chunk)`, `pipe(source)`, `end()`;
   * chunks are stored with absolute offsets and relayed live (docs/guide/streams.md). The same
   * object for the same name.
   */
  stream: (name: string) => JobStream
}

export interface JobWorkerOptions {
  /** The kind, as registered with the plugin. */
  kind: string
  /** Its queue name. @default the kind */
  queueName?: string
  /** Redis: a client, options or a URL. @default 'redis://127.0.0.1:6379' */
  connection?: Redis | RedisOptions | string
  /** BullMQ's key prefix; the plugin's `prefix`. @default 'bull' */
  prefix?: string
  /** The plugin's `channelPrefix`. @default 'jp' */
  channelPrefix?: string
  /** Where uploads are; the plugin's `storage`. @default a DiskStorage on the plugin's default `uploadDir` */
  storage?: Storage
  /** More BullMQ worker options (concurrency, lockDuration ...). */
  workerOptions?: Omit<WorkerOptions, 'connection' | 'prefix'>
  /** Where the helper's warnings go (a report over the size limits). @default process.emitWarning */
  warn?: (message: string) => void
  /**
   * How `log()` relays lines live: the plugin's `pubsub`. @default sharded on a Cluster
   * connection, classic otherwise
   */
  pubsub?: 'classic' | 'sharded'
  /**
   * OpenTelemetry traces through the SDK the process registered (see docs/tracing.md): a
   * `process <queue>` span under the context the job was added with (BullMQ's own when
   * `workerOptions.telemetry` is given), a `report <queue>` span per report, and a sampled
   * report's traceparent in the progress value for the plugin's delivery spans. A no-op without
   * an SDK. @default true
   */
  tracing?: boolean
  /** Limits of `ctx.stream()`: `maxBytes`, `maxChunks`, `maxChunkBytes`, `retentionSeconds`. @default {@link STREAM_LIMITS} */
  streams?: Partial<StreamLimits>
  /**
   * `close()` resolves within this long (plus at most 1 s): past it, the worker's own Redis
   * connections are ended at once, so a close during a Redis outage does not wait for Redis to
   * come back (a connection passed in `connection` is left open). A job still running then is
   * not waited for; its lock expires and another worker takes it. @default 5_000
   */
  closeTimeoutMs?: number
}

/**
 * A BullMQ worker for one kind: the processor gets the uploaded file, reports
 * `{ processed, total }` and stops when the job is cancelled. The upload is not removed here: an
 * attempt cannot know it was the last (its lock may have expired and another attempt started), so
 * the plugin removes it once the job's final state is recorded in Redis.
 */
export function createJobWorker<R> (opts: JobWorkerOptions, handler: (ctx: JobContext) => Promise<R>): Worker<UploadJobData, R> {
  const queue = opts.queueName ?? opts.kind
  const keys = new Keys({ prefix: opts.prefix ?? 'bull', channelPrefix: opts.channelPrefix ?? 'jp' })
  const storage = opts.storage ?? new DiskStorage(join(tmpdir(), 'fastify-job-progress'))
  const warn = opts.warn ?? ((message: string) => process.emitWarning(message, 'JobProgressWarning'))
  const closeTimeoutMs = closeTimeout(opts.closeTimeoutMs)
  // A URL becomes a client of ours, closed with the worker; BullMQ workers block, hence null retries.
  const fromUrl = typeof opts.connection === 'string' || opts.connection === undefined
    ? new IORedis(opts.connection ?? 'redis://127.0.0.1:6379', { maxRetriesPerRequest: null })
    : null
  const connection = fromUrl ?? opts.connection
  // eslint-disable-next-line prefer-const
  let worker: Worker<UploadJobData, R>

  const client = async (): Promise<Redis> => await worker.getBackend().client as unknown as Redis
  // Cancelled, or deleted (`DELETE <basePath>/:jobId`): either way the attempt stops.
  const cancelled = async (jobId: string): Promise<boolean> => {
    return await (await client()).exists(keys.cancel(queue, jobId), keys.deleted(queue, jobId)) > 0
  }

  async function processor (job: Job<UploadJobData>, _token?: string, bullSignal?: AbortSignal): Promise<R> {
    const jobId = job.id as string
    const abort = new AbortController()
    bullSignal?.addEventListener('abort', () => abort.abort(bullSignal.reason), { once: true })
    const { fields } = job.data
    const file = job.data.file ?? NO_FILE
    if (await cancelled(jobId)) throw new JobCancelledError()
    const streams = new Map<string, JobStream>()
    const traces = opts.tracing === false ? noJobTrace : jobTrace(job, queue, opts.workerOptions?.telemetry !== undefined)
    return await traces.run(async () => await handler({
      job,
      file,
      fields: fields ?? {},
      data: (job.data as { data?: Record<string, unknown> }).data ?? {},
      open: () => {
        if (file.key === '') throw new Error('this job was created without a file')
        return storage.open(file.key)
      },
      path: file.key === '' ? null : storage.localPath?.(file.key) ?? null,
      signal: abort.signal,
      stream (name) {
        let s = streams.get(name)
        if (s === undefined) streams.set(name, s = jobStream(client, keys, queue, jobId, name, { ...STREAM_LIMITS, ...opts.streams }, opts.pubsub))
        return s
      },
      async log (line) {
        const redis = await client()
        const cut = cutLine(String(line))
        if (cut !== null) warn(`job-progress: job ${jobId}: a log line of ${String(line).length} characters is over the limit (8,192): stored and relayed cut, ending with " [cut]"`)
        return await appendLog(redis, keys, queue, jobId, cut ?? String(line), job.opts.keepLogs ?? 0, scriptRelay(redis, opts.pubsub))
      },
      async putOutput (name, source, type) {
        const redis = await client()
        const file = await putOutput(redis, keys, storage, queue, opts.kind, jobId, name, source, type)
        // A delete that ran meanwhile did not see this file: it is removed here instead.
        if (await cancelled(jobId)) {
          await redis.hdel(keys.outputs(queue, jobId), name)
          await storage.remove(file.key)
          abort.abort(new JobCancelledError())
          throw new JobCancelledError()
        }
        return file
      },
      async report (processed, total, details) {
        // The attempt lets watchers tell a retry's progress from the failed attempt's.
        let gone: unknown = null
        // Limits applied here too, so what is stored is what watchers get, and the worker's
        // author learns of it where the report is made.
        const clipped: Clipped = []
        const extra = details === undefined ? {} : progressDetails(details, clipped)
        if (clipped.length > 0) warn(`job-progress: job ${jobId}: progress ${clipped.join(', ')} over the size limit (stage 64 and message 1,024 characters, data 4 KiB as JSON): cut or dropped; the counts went through`)
        // A cancelled job no longer exists in the queue, so the update itself fails then. Any
        // other failure is Redis away (a restart, the queue's master failing over): the report
        // waits for it, up to the lock's duration, instead of failing a job that still runs.
        const deadline = Date.now() + (opts.workerOptions?.lockDuration ?? 30_000)
        const span = traces.report(processed, total)
        const tp = span.traceparent === undefined ? undefined : { [TRACEPARENT_FIELD]: span.traceparent }
        for (let delay = 100; ; delay = Math.min(2 * delay, 2_000)) {
          try {
            await job.updateProgress({ processed, total, attempt: Math.max(job.attemptsStarted, 1), ...extra, ...tp })
            break
          } catch (err) {
            if (/^Missing key for job/.test((err as Error)?.message) || Date.now() + delay > deadline || abort.signal.aborted) {
              gone = err
              break
            }
            await new Promise(resolve => setTimeout(resolve, delay))
          }
        }
        span.end(gone)
        if (await cancelled(jobId)) {
          abort.abort(new JobCancelledError())
          throw new JobCancelledError()
        }
        if (gone !== null) throw gone
      }
    }))
  }

  worker = new Worker<UploadJobData, R>(queue, processor, { ...opts.workerOptions, connection: connection as never, prefix: opts.prefix ?? 'bull' })
  boundClose(worker, { timeoutMs: closeTimeoutMs, keep: fromUrl === null ? opts.connection : undefined, own: fromUrl === null ? [] : [fromUrl] })
  if (fromUrl !== null) {
    fromUrl.on('error', () => {})
    worker.on('closed', () => { void quitWithin(fromUrl, AFTER_FORCE_MS) })
  }
  return worker
}
