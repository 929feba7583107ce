import type { MultipartFile, MultipartValue } from '@fastify/multipart'
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { Queue } from 'bullmq'
import { createHash, randomUUID } from 'node:crypto'
import { extname } from 'node:path'
import type { Readable } from 'node:stream'
import {
  EmptyFileError, FieldTooLargeError, FileTooLargeError, MalformedMultipartError, NoFileError, NotMultipartError,
  QueueUnavailableError, TooManyFieldsError, TooManyFilesError, TooManyPartsError, UnauthorizedError,
  UnsupportedFileTypeError, UploadIdleError, UploadShutdownError, UploadTimeoutError, UploadTooSlowError
} from '../../errors'
import { admitJob, precheckQuota, type AdmissionContext } from '../create/admission'
import { fingerprint, idempotencyKeyOf } from '../create/idempotency'
import type { Owners } from '../auth/identity'
import type { Storage } from '../../core/storage'
import type { UploadJobData } from '../../core/job-data'
import { drainBody, watchRate, type UploadGuardOptions } from './upload-guard'

export interface UploadRoute {
  kind: string
  queue: Queue
  /** Whether the queue's Redis connection is up right now. */
  queueReady: () => boolean
  accept: string[]
  maxFileSize: number
  statusUrl: (jobId: string) => string
  wsPath: (jobId: string) => string
  /** Checks (and may keep) the form's fields before the job is added; throws to refuse the upload. */
  beforeAdd?: (jobId: string, fields: Record<string, string>, owner: string) => Promise<void>
  /** Idempotency keys and quotas, shared with the other ways of creating a job. */
  admission?: AdmissionContext
  /** Who writes the file (the instance id): its partial file carries it, so a restart finds its own. */
  writer?: string
}

/** The options the upload routes read: the multipart limits, the upload time limits, the public URL. */
export interface UploadOptionsSlice {
  publicUrl?: string
  limits: { fileSize: number, fields: number, fieldSize: number, parts: number }
  uploads: { idleTimeoutMs: number, requestTimeoutMs: number, shutdownGraceMs: number } & UploadGuardOptions
}

/** The 202 answer to a created job, the same for an upload, a JSON create and a repeated request. */
export function acceptedBody (route: Pick<UploadRoute, 'statusUrl' | 'wsPath'>, opts: { publicUrl?: string }, prefix: string, jobId: string): { job_id: string, status_url: string, ws_url: string } {
  return {
    job_id: jobId,
    status_url: prefix + route.statusUrl(jobId),
    ws_url: wsUrl(opts.publicUrl, prefix + route.wsPath(jobId))
  }
}

/** `{ watch_token }` for a new job, or nothing when no secret is configured for tokens. */
export function watchTokenFor (owners: Owners, kind: string, jobId: string, owner: string): { watch_token?: string } {
  return owners.watchTokens === null ? {} : { watch_token: owners.watchTokens.sign({ kind, jobId, owner }).token }
}

/** A MIME type (`text/csv`, `text/*`) or an extension (`.csv`) from the kind's `accept` list. */
export function accepts (accept: string[], mimetype: string, filename: string): boolean {
  if (accept.length === 0) return true
  const type = mimetype.toLowerCase().split(';')[0].trim()
  const ext = extname(filename).toLowerCase()
  return accept.some(a => {
    const rule = a.toLowerCase()
    if (rule.startsWith('.')) return rule === ext
    if (rule.endsWith('/*')) return type.startsWith(rule.slice(0, -1))
    return rule === type
  })
}

/**
 * The uploads still being received, so that `app.close()` can end them after a grace period
 * instead of waiting for a slow client (a trickling upload would otherwise hold the shutdown).
 */
export class InFlightUploads {
  readonly #aborts = new Set<(err: Error) => void>()
  #timer: NodeJS.Timeout | null = null
  #closing = false

  /** Calls `abort` at shutdown, unless the returned function was called first. */
  track (abort: (err: Error) => void): () => void {
    if (this.#closing && this.#timer === null) abort(new UploadShutdownError())
    this.#aborts.add(abort)
    return () => { this.#aborts.delete(abort) }
  }

  get size (): number {
    return this.#aborts.size
  }

  get isClosing (): boolean {
    return this.#closing
  }

  /** Starts the grace period: uploads still running when it ends are answered 503. */
  closing (graceMs: number): void {
    this.#closing = true
    const abortAll = (): void => {
      this.#timer = null
      for (const abort of this.#aborts) abort(new UploadShutdownError())
    }
    if (graceMs === 0) abortAll()
    else this.#timer = setTimeout(abortAll, graceMs)
  }

  closed (): void {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
  }
}

/** Ties in-flight uploads to the app's close: a line in the plugin, the rest here. */
export function uploadShutdown (fastify: FastifyInstance, opts: Pick<UploadOptionsSlice, 'uploads'>): InFlightUploads {
  const inflight = new InFlightUploads()
  fastify.addHook('preClose', async () => { inflight.closing(opts.uploads.shutdownGraceMs) })
  fastify.addHook('onClose', async () => { inflight.closed() })
  return inflight
}

/** `ws_url`: from the configured public URL, else a path; never from request headers. */
export function wsUrl (publicUrl: string | undefined, path: string): string {
  if (publicUrl === undefined) return path
  return publicUrl.replace(/^http/, 'ws').replace(/\/+$/, '') + path
}

/**
 * Errors of the multipart parser (a missing or wrong boundary, a missing end, bad part headers)
 * are the client's: they carry no HTTP status and, unlike storage errors, no `syscall`.
 */
function isParserError (err: unknown): err is Error {
  return err instanceof Error && (err as { statusCode?: number }).statusCode === undefined &&
    (err as { syscall?: string }).syscall === undefined && (err as { code?: string }).code === undefined
}

/**
 * Builds the upload handler of one kind: the file is streamed to storage (never buffered whole),
 * then one BullMQ job is added. Whatever goes wrong before the job exists, the stored file is
 * removed, so a failed upload leaves neither a file nor a job behind. An upload that goes idle,
 * sends too slowly, takes too long or is still running at shutdown is ended with its own status;
 * its connection is closed after the answer, so the rest of a slow body is not waited for. Any
 * other refusal reads the rest of the body first, within bounds, so the client can read why.
 */
export function uploadHandler (route: UploadRoute, opts: UploadOptionsSlice, owners: Owners, storage: Storage, inflight: InFlightUploads = new InFlightUploads()) {
  const limits = { ...opts.limits, fileSize: route.maxFileSize, files: 1 }
  // @fastify/multipart's limit errors, reworded with the limit so a person can act on them.
  const limitErrors: Record<string, () => Error> = {
    FST_REQ_FILE_TOO_LARGE: () => new FileTooLargeError(route.maxFileSize),
    FST_FILES_LIMIT: () => new TooManyFilesError(),
    FST_PARTS_LIMIT: () => new TooManyPartsError(limits.parts),
    FST_FIELDS_LIMIT: () => new TooManyFieldsError(limits.fields)
  }
  const { idleTimeoutMs, requestTimeoutMs, minBytesPerSecond, minRateWindowMs } = opts.uploads
  return async function upload (request: FastifyRequest, reply: FastifyReply) {
    const connection = { cut: false }
    try {
      return await receive(request, reply, connection)
    } catch (err) {
      const raw = request.raw
      if (!connection.cut && !raw.destroyed && !raw.complete) {
        const whole = await drainBody(raw, opts.uploads)
        reply.header('connection', 'close')
        if (!whole) reply.raw.once('finish', () => raw.socket?.destroy())
      }
      throw err
    }
  }

  async function receive (request: FastifyRequest, reply: FastifyReply, connection: { cut: boolean }): Promise<FastifyReply> {
    if (!request.isMultipart()) throw new NotMultipartError()
    const idempotencyKey = idempotencyKeyOf(request)
    let identity = await owners.fromRequest(request)
    if (identity === null) {
      if (!owners.issuesSessions) throw new UnauthorizedError('no credentials')
      identity = owners.startSession(request, reply)
    }
    // Refuse before reading a byte when the job could not be queued anyway.
    if (!route.queueReady()) throw new QueueUnavailableError()
    if (route.admission !== undefined) await precheckQuota(route.admission, route.queue.name, identity.owner, reply, idempotencyKey)

    // Ending an upload early: the file being written gets the error (storage removes its partial
    // file), and a wait for the next part is cut short.
    let current: Readable | null = null
    let stop: ((err: Error) => void) | null = null
    let ended: Error | null = null
    const stopped = new Promise<never>((_resolve, reject) => { stop = reject })
    stopped.catch(() => {})
    const end = (err: Error): void => {
      if (ended !== null) return
      ended = err
      current?.destroy(err)
      stop?.(err)
    }
    const raw = request.raw
    const idle = setTimeout(() => end(new UploadIdleError(idleTimeoutMs)), idleTimeoutMs)
    const onData = (): void => { idle.refresh() }
    raw.on('data', onData)
    const total = setTimeout(() => end(new UploadTimeoutError(requestTimeoutMs)), requestTimeoutMs)
    const stopRate = watchRate(raw, opts.uploads, () => end(new UploadTooSlowError(minBytesPerSecond, minRateWindowMs)))
    const untrack = inflight.track(end)
    const done = (): void => {
      clearTimeout(idle)
      clearTimeout(total)
      raw.off('data', onData)
      stopRate()
      untrack()
    }

    let jobId: string = randomUUID()
    const fields: Record<string, string> = {}
    let stored: { key: string, size: number } | null = null
    let file: UploadJobData['file'] | null = null
    // What the multipart parser raised (a bad body is the client's fault: 400); a failure of the
    // storage, a hook or Redis is not.
    let parserError: unknown = null
    const fromParser = (err: unknown): never => {
      parserError = err
      throw err
    }
    try {
      const parts = request.parts({ limits })[Symbol.asyncIterator]()
      for (;;) {
        const next = await Promise.race([parts.next().catch(fromParser), stopped])
        if (next.done === true) break
        const part = next.value
        if (part.type === 'field') {
          const field = part as MultipartValue & { valueTruncated?: boolean, fieldnameTruncated?: boolean }
          if (field.valueTruncated === true || field.fieldnameTruncated === true) throw new FieldTooLargeError(field.fieldname, limits.fieldSize)
          fields[field.fieldname] = String(field.value)
          continue
        }
        const upload = part as MultipartFile
        if (stored !== null) {
          upload.file.resume()
          throw new TooManyFilesError()
        }
        if (!accepts(route.accept, upload.mimetype, upload.filename)) {
          upload.file.resume()
          throw new UnsupportedFileTypeError(upload.mimetype, route.accept.join(', '))
        }
        current = upload.file
        try {
          stored = await storage.write(upload.file, { kind: route.kind, jobId, filename: upload.filename, mimetype: upload.mimetype, ...(route.writer === undefined ? {} : { writer: route.writer }) })
        } catch (err) {
          // The file's own stream failed: the body broke off inside the file part. (The parser
          // may fail the part with one error and the write with another, "Part terminated early".)
          if (upload.file.errored !== null && upload.file.errored !== undefined) fromParser(err)
          throw err
        }
        current = null
        if (upload.file.truncated) throw new FileTooLargeError(route.maxFileSize)
        if (stored.size === 0) throw new EmptyFileError(upload.filename)
        file = { key: stored.key, name: upload.filename, size: stored.size, type: upload.mimetype }
      }
      done()
      if (ended !== null) throw ended
      if (file === null) throw new NoFileError()
      // The client gave up while we were reading: nobody would ever learn this job's id.
      if (raw.destroyed && !raw.complete) throw new Error('client aborted the upload')
      const f = file
      const id = jobId
      const owner = identity.owner
      const data: UploadJobData = { owner: identity.owner, kind: route.kind, file: f, fields }
      const admitted = await admitJob(route.admission ?? plainAdmission(request), {
        queue: route.queue,
        kind: route.kind,
        jobId,
        owner: identity.owner,
        data: data as unknown as Record<string, unknown>,
        idempotencyKey,
        // The file's bytes are part of what a repeated request must match: read back only then.
        digest: async () => fingerprint({ fields, name: f.name, type: f.type, size: f.size, content: await contentDigest(storage, f.key) }),
        beforeAdd: async () => await route.beforeAdd?.(id, fields, owner),
        reply
      })
      if (!admitted.created) {
        // A repeated request: its own copy of the file is not needed, the first job has one.
        await storage.remove(f.key).catch(() => {})
        jobId = admitted.jobId
      }
    } catch (caught) {
      done()
      if (stored !== null) await storage.remove(stored.key).catch(() => {})
      const err = ended ?? caught
      if (ended !== null || inflight.isClosing) {
        // Too slow, too long or shutting down: the rest of the body is not read, the connection
        // closes once the answer is sent. (Other refusals read it first: see `upload`.)
        connection.cut = true
        reply.header('connection', 'close')
        reply.raw.once('finish', () => raw.socket?.destroy())
      }
      const code = (err as { code?: string }).code
      if (code !== undefined && Object.hasOwn(limitErrors, code)) throw limitErrors[code]()
      // (A client that left is not answered: its own abort is not a malformed body.)
      if (err === parserError && isParserError(err) && !(raw.destroyed && !raw.complete)) throw new MalformedMultipartError(err.message)
      throw err
    }
    // At shutdown, the connection is not kept alive for a next request that would be refused.
    if (inflight.isClosing) reply.header('connection', 'close')
    // Registered inside a prefixed context (`register(..., { prefix: '/api' })`), the routes
    // carry the prefix: so do the URLs that point at them.
    // The token lets another origin or app watch this one job without the session (watchTokens).
    return reply.code(202).send({ ...acceptedBody(route, opts, request.server.prefix, jobId), ...watchTokenFor(owners, route.kind, jobId, identity.owner) })
  }
}

/** A digest of a stored file's bytes. */
async function contentDigest (storage: Storage, key: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of storage.open(key)) hash.update(chunk as Buffer)
  return hash.digest('hex')
}

/** Without the plugin's wiring (unit use of the handler): no keys, no quotas. */
function plainAdmission (request: FastifyRequest): AdmissionContext {
  return {
    log: request.log,
    idempotency: { lookup: async () => null, claim: async (_q: string, _o: string, _k: string, _d: string, jobId: string) => jobId, release: async () => {} } as unknown as AdmissionContext['idempotency'],
    quotas: { admit: async () => {}, release: async () => {} } as unknown as AdmissionContext['quotas']
  }
}
