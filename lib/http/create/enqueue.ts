import Ajv from 'ajv'
import addFormats from 'ajv-formats'
import type { FastifyInstance, FastifyReply, FastifyRequest, FastifySchemaCompiler } from 'fastify'
import type { Queue } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { admitJob, type AdmissionContext } from './admission'
import { InvalidFileReferenceError, QueueUnavailableError, UnauthorizedError } from '../../errors'
import { AcceptedSchema, errors, IdempotencyHeaders } from '../schemas'
import { fingerprint, idempotencyKeyOf } from './idempotency'
import type { Owners } from '../auth/identity'
import { acceptedBody, watchTokenFor } from '../uploads/upload-route'
import type { UploadJobData } from '../../core/job-data'

/** A file the job reads, already in storage (the storage's key), with what a worker is told of it. */
export interface FileReference {
  key: string
  name?: string
  size?: number
  type?: string
}

/** A kind's JSON create route (`create` kind option). */
export interface CreateRouteOptions {
  /** JSON schema (a TypeBox schema works) of the job's `data`. @default any JSON object */
  schema?: Record<string, unknown>
  /**
   * Admits a client's `file` reference and describes it, or returns null to refuse it (400). A
   * client can name any key, so without this hook a body with `file` is refused: only the
   * application can tell which stored files a requester may use. @default undefined (no references)
   */
  resolveFile?: (request: FastifyRequest, ref: FileReference, owner: string) => Promise<FileReference | null> | FileReference | null
}

/** What `app.jobProgress.enqueue(kind, input)` takes. */
export interface EnqueueInput {
  /** The job's input, given to the worker as `ctx.data`. */
  data: Record<string, unknown>
  /** A file already in storage that the worker opens with `ctx.open()`; trusted as given. */
  file?: FileReference
  /** Who owns the job: the value the routes and sockets check (see `canAccess`). */
  owner: string
  /** Same key and owner within `idempotency.windowSeconds`: the first call's job, not a second one. */
  idempotencyKey?: string
}

/** The answer to a created job, as the routes answer 202. */
export interface EnqueueResult {
  jobId: string
  statusUrl: string
  wsUrl: string
  /** False when an earlier call with the same idempotency key made the job. */
  created: boolean
}

export interface CreateKind {
  kind: string
  queue: Queue
  queueReady: () => boolean
  statusUrl: (jobId: string) => string
  wsPath: (jobId: string) => string
  beforeAdd?: (jobId: string, fields: Record<string, string>, owner: string) => Promise<void>
}

/** The data a job made from JSON stores; the same shape as an upload's, with `data`. */
function jobData (kind: string, owner: string, data: Record<string, unknown>, file: FileReference | undefined): UploadJobData {
  const stored = file === undefined ? undefined : { key: file.key, name: file.name ?? '', size: file.size ?? 0, type: file.type ?? 'application/octet-stream' }
  return { owner, kind, fields: {}, data, ...(stored === undefined ? {} : { file: stored }) } as unknown as UploadJobData
}

/**
 * Creates one job from fields (and a stored file): the path the JSON route and server code
 * share with uploads, so ownership, idempotency keys, quotas and the webhook check hold alike.
 */
export async function createJob (admission: AdmissionContext, k: CreateKind, input: EnqueueInput, reply?: FastifyReply): Promise<{ jobId: string, created: boolean }> {
  if (typeof input.owner !== 'string' || input.owner === '') throw new UnauthorizedError('a job needs an owner')
  if (!k.queueReady()) throw new QueueUnavailableError()
  const jobId = randomUUID()
  return await admitJob(admission, {
    queue: k.queue,
    kind: k.kind,
    jobId,
    owner: input.owner,
    data: jobData(k.kind, input.owner, input.data, input.file) as unknown as Record<string, unknown>,
    idempotencyKey: input.idempotencyKey,
    digest: async () => fingerprint({ data: input.data, file: input.file ?? null }),
    beforeAdd: async () => await k.beforeAdd?.(jobId, stringFields(input.data), input.owner),
    reply
  })
}

/** The webhook check reads text fields (`webhook_url` ...): the data's strings, as a form's. */
function stringFields (data: Record<string, unknown>): Record<string, string> {
  return Object.fromEntries(Object.entries(data).filter(([, v]) => typeof v === 'string')) as Record<string, string>
}

const FileReferenceSchema = {
  type: 'object',
  properties: {
    key: { type: 'string', minLength: 1, maxLength: 1024 },
    name: { type: 'string', maxLength: 255 },
    size: { type: 'integer', minimum: 0 },
    type: { type: 'string', maxLength: 255 }
  },
  required: ['key'],
  additionalProperties: false
} as const

/**
 * The app's validator removes properties a schema does not allow (Fastify's default
 * `removeAdditional`), so a misspelt field would create a job without it. This route refuses
 * them instead, with a 400 naming the property, and coerces nothing.
 */
const strictAjv = new Ajv({ removeAdditional: false, coerceTypes: false, useDefaults: true, allErrors: false, strict: false })
addFormats(strictAjv)
const strictValidator: FastifySchemaCompiler<unknown> = ({ schema }) => strictAjv.compile(schema as object)

/** `POST <basePath>` of one kind: a job from a JSON body `{ data, file? }`, answered 202 like an upload. */
export function registerCreateRoute (fastify: FastifyInstance, opts: { publicUrl?: string }, owners: Owners, admission: AdmissionContext, k: CreateKind, path: string, create: CreateRouteOptions): void {
  const body = {
    type: 'object',
    properties: { data: create.schema ?? { type: 'object', additionalProperties: true }, file: FileReferenceSchema },
    required: ['data'],
    additionalProperties: false
  }
  const schema = {
    summary: `Create a ${k.kind} job from JSON`,
    headers: IdempotencyHeaders,
    body,
    response: { 202: AcceptedSchema, ...errors(400, 401, 422, 429, 503) }
  }
  fastify.post(path, { schema, validatorCompiler: strictValidator }, async (request: FastifyRequest<{ Body: { data: Record<string, unknown>, file?: FileReference } }>, reply) => {
    const idempotencyKey = idempotencyKeyOf(request)
    // Owned as an upload is: a request without credentials starts a session (when sessions are the fallback).
    let identity = await owners.fromRequest(request)
    if (identity === null) {
      if (!owners.issuesSessions) throw new UnauthorizedError('no credentials')
      identity = owners.startSession(request, reply)
    }
    let file: FileReference | undefined
    if (request.body.file !== undefined) {
      if (create.resolveFile === undefined) throw new InvalidFileReferenceError('this kind takes no file references')
      const resolved = await create.resolveFile(request, request.body.file, identity.owner)
      if (resolved === null || typeof resolved?.key !== 'string') throw new InvalidFileReferenceError('unknown file or not yours')
      file = resolved
    }
    const { jobId } = await createJob(admission, k, { data: request.body.data, file, owner: identity.owner, idempotencyKey }, reply)
    return reply.code(202).send({ ...acceptedBody(k, opts, request.server.prefix, jobId), ...watchTokenFor(owners, k.kind, jobId, identity.owner) })
  })
}
