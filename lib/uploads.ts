import type { MultipartFile, MultipartValue } from '@fastify/multipart'
import type { FastifyReply, FastifyRequest } from 'fastify'
import type { Queue } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { extname } from 'node:path'
import {
  EmptyFileError, FileTooLargeError, NoFileError, NotMultipartError, QueueUnavailableError,
  TooManyFieldsError, TooManyFilesError, TooManyPartsError, UnauthorizedError, UnsupportedFileTypeError
} from './errors'
import type { Owners } from './owner'
import type { ResolvedOptions } from './options'
import type { Storage } from './storage'

/** What an upload stores in its BullMQ job's data. */
export interface UploadJobData {
  owner: string
  kind: string
  file: { key: string, name: string, size: number, type: string }
  fields: Record<string, string>
}

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
 * Builds the upload handler of one kind: the file is streamed to storage (never buffered whole),
 * then one BullMQ job is added. Whatever goes wrong before the job exists, the stored file is
 * removed, so a failed upload leaves neither a file nor a job behind.
 */
export function uploadHandler (route: UploadRoute, opts: ResolvedOptions, owners: Owners, storage: Storage) {
  const limits = { ...opts.limits, fileSize: route.maxFileSize, files: 1 }
  // @fastify/multipart's limit errors, reworded with the limit so a person can act on them.
  const limitErrors: Record<string, () => Error> = {
    FST_REQ_FILE_TOO_LARGE: () => new FileTooLargeError(route.maxFileSize),
    FST_FILES_LIMIT: () => new TooManyFilesError(),
    FST_PARTS_LIMIT: () => new TooManyPartsError(limits.parts),
    FST_FIELDS_LIMIT: () => new TooManyFieldsError(limits.fields)
  }
  return async function upload (request: FastifyRequest, reply: FastifyReply) {
    if (!request.isMultipart()) throw new NotMultipartError()
    let identity = await owners.fromRequest(request)
    if (identity === null) {
      if (!owners.issuesSessions) throw new UnauthorizedError('no credentials')
      identity = owners.startSession(request, reply)
    }
    // Refuse before reading a byte when the job could not be queued anyway.
    if (!route.queueReady()) throw new QueueUnavailableError()

    const jobId = randomUUID()
    const fields: Record<string, string> = {}
    let stored: { key: string, size: number } | null = null
    let file: UploadJobData['file'] | null = null
    try {
      for await (const part of request.parts({ limits })) {
        if (part.type === 'field') {
          fields[part.fieldname] = String((part as MultipartValue).value)
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
        stored = await storage.write(upload.file, { kind: route.kind, jobId, filename: upload.filename, mimetype: upload.mimetype })
        if (upload.file.truncated) throw new FileTooLargeError(route.maxFileSize)
        if (stored.size === 0) throw new EmptyFileError(upload.filename)
        file = { key: stored.key, name: upload.filename, size: stored.size, type: upload.mimetype }
      }
      if (file === null) throw new NoFileError()
      // The client gave up while we were reading: nobody would ever learn this job's id.
      if (request.raw.destroyed && !request.raw.complete) throw new Error('client aborted the upload')
      await route.beforeAdd?.(jobId, fields, identity.owner)
      const data: UploadJobData = { owner: identity.owner, kind: route.kind, file, fields }
      try {
        await route.queue.add(route.kind, data, { jobId })
      } catch (err) {
        request.log.warn({ err }, 'job-progress: could not add the job')
        throw new QueueUnavailableError()
      }
    } catch (err) {
      if (stored !== null) await storage.remove(stored.key).catch(() => {})
      const code = (err as { code?: string }).code
      if (code !== undefined && Object.hasOwn(limitErrors, code)) throw limitErrors[code]()
      throw err
    }
    const host = request.headers.host ?? `${request.hostname}`
    return reply.code(202).send({
      job_id: jobId,
      status_url: route.statusUrl(jobId),
      ws_url: `${request.protocol === 'https' ? 'wss' : 'ws'}://${host}${route.wsPath(jobId)}`
    })
  }
}
