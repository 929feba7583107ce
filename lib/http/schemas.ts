/**
 * The JSON schemas of the plugin's HTTP routes, request and response, in one place: Fastify
 * validates and serializes with them, and `@fastify/swagger` documents the routes from them.
 * Response schemas also serialize: every property a route sends is listed here.
 */

/**
 * Open (`additionalProperties`, nothing required): a host app's error handler may answer in its
 * own shape, and a response schema must not strip or refuse it.
 */
export const ErrorSchema = {
  description: 'An error (see the README\'s Errors table for each `code`)',
  type: 'object',
  properties: { statusCode: { type: 'integer' }, code: { type: 'string' }, error: { type: 'string' }, message: { type: 'string' } },
  additionalProperties: true
} as const

/** Error responses a route may answer, each with {@link ErrorSchema}. */
export function errors (...codes: number[]): Record<number, typeof ErrorSchema> {
  return Object.fromEntries(codes.map(code => [code, ErrorSchema]))
}

export const JobParams = {
  type: 'object',
  properties: { jobId: { type: 'string', description: 'the job id (a UUID)' } },
  required: ['jobId']
} as const

export const AcceptedSchema = {
  description: 'The job was created (or, for a repeated Idempotency-Key, found)',
  type: 'object',
  properties: {
    job_id: { type: 'string', format: 'uuid' },
    status_url: { type: 'string' },
    ws_url: { type: 'string' },
    watch_token: { type: 'string', description: 'a signed, expiring token to watch this one job without the session (`?token=`); absent when no secret is configured for tokens' }
  },
  required: ['job_id', 'status_url', 'ws_url']
} as const

export const IdempotencyHeaders = {
  type: 'object',
  properties: { 'idempotency-key': { type: 'string', minLength: 1, maxLength: 255, description: 'same key and owner within the window: the first answer, never a second job' } }
} as const

/** Seed 000's message: the status route and the `/ws/<kind>/<jobId>` socket. */
export const ProgressMessageSchema = {
  description: 'The job\'s current state',
  type: 'object',
  properties: {
    job_id: { type: 'string' },
    status: { type: 'string', enum: ['processing', 'complete', 'failed', 'cancelled'] },
    progress: { type: 'number', minimum: 0, maximum: 100 },
    processed: { type: 'number' },
    total: { type: 'number' },
    eta_seconds: { type: ['integer', 'null'] },
    error: { type: 'string' },
    version: { type: 'string' },
    stage: { type: 'string', description: 'the worker\'s stage (`progressDetails` option)' },
    message: { type: 'string', description: 'the worker\'s message (`progressDetails` option)' },
    data: { description: 'the worker\'s small data (`progressDetails` option)' }
  },
  required: ['job_id', 'status', 'progress', 'processed', 'total', 'eta_seconds']
} as const

export const ResultSchema = {
  description: 'The completed job\'s result, and its output files when it has some',
  type: 'object',
  properties: {
    job_id: { type: 'string' },
    result: { description: 'what the worker returned' },
    outputs: {
      type: 'array',
      items: {
        type: 'object',
        properties: { name: { type: 'string' }, size: { type: 'integer' }, type: { type: 'string' }, url: { type: 'string' } },
        required: ['name', 'size', 'type', 'url']
      }
    }
  },
  required: ['job_id', 'result']
} as const

export const CancelledSchema = {
  type: 'object',
  properties: { job_id: { type: 'string' }, status: { type: 'string', enum: ['cancelled'] } },
  required: ['job_id', 'status']
} as const

/** `POST <basePath>/:jobId/watch-token`: a fresh token to watch one job. */
export const WatchTokenSchema = {
  description: 'A signed, expiring token to watch this one job without the owner\'s credentials (`?token=`)',
  type: 'object',
  properties: {
    job_id: { type: 'string' },
    watch_token: { type: 'string' },
    expires_at: { type: 'string', format: 'date-time' }
  },
  required: ['job_id', 'watch_token', 'expires_at']
} as const

/** The multipart upload route: documented, not validated by Ajv (the handler streams and checks the parts). */
export function uploadSchema (kind: string, accept: string[]): Record<string, unknown> {
  return {
    summary: `Upload a file to create a ${kind} job`,
    consumes: ['multipart/form-data'],
    headers: IdempotencyHeaders,
    body: {
      type: 'object',
      properties: {
        file: { type: 'string', format: 'binary', description: accept.length === 0 ? 'the file (any type)' : `the file: ${accept.join(', ')}` }
      },
      additionalProperties: { type: 'string', description: 'text fields, given to the worker as `ctx.fields`' },
      required: ['file']
    },
    response: { 202: AcceptedSchema, ...errors(400, 401, 408, 413, 415, 422, 429, 503) }
  }
}

/** The multipart body is read by the handler, part by part; Ajv never sees it. */
export const noBodyValidation = (): (() => true) => () => true

/** A query parameter the handler reads whether it is given once or repeated. */
const stringOrList = { anyOf: [{ type: 'string' }, { type: 'array', items: { type: 'string' } }] }

/** SSE routes: the stream is `text/event-stream`, refusals before it are JSON. */
export function sseSchema (perJob: boolean): Record<string, unknown> {
  return {
    summary: perJob ? 'Server-Sent Events of one job' : 'Server-Sent Events of several jobs (`?jobs=<id>,<id>`)',
    produces: ['text/event-stream'],
    ...(perJob ? { params: JobParams } : {}),
    querystring: {
      type: 'object',
      properties: {
        ...(perJob ? {} : { jobs: { ...stringOrList, description: 'job ids, comma-separated (or the parameter repeated)' } }),
        lastEventId: { ...stringOrList, description: 'resume after this event (instead of the Last-Event-ID header)' },
        logs: { type: 'string', enum: ['1', 'true'], description: 'also stream the job\'s log lines (`log` events), from the oldest line kept' },
        logs_from: { type: 'integer', minimum: 0, maximum: Number.MAX_SAFE_INTEGER, description: 'also stream the job\'s log lines from this absolute offset' },
        streams_from: { type: 'string', maxLength: 4096, description: 'also stream named streams (`stream` events): `<name>:<offset>` for every job, or `<jobId>@<name>:<offset>` for one, comma-separated' }
      }
    },
    response: {
      200: { description: 'a text/event-stream of `job_update`, `error` and `close` events (see the README)', type: 'string' },
      204: { description: 'every job had already ended (Last-Event-ID `done`)', type: 'null' },
      ...errors(400, 401, 404, 429)
    }
  }
}
