import type { JobUpdate } from './types'

/** Every error the client raises; `instanceof` tells them apart. */
export class JobProgressError extends Error {
  // Set by hand: a minifier renames classes, and `name` is what people read.
  override name = 'JobProgressError'
}

/** Credentials missing or refused (HTTP 401, close 4001): retrying cannot help until they change. */
export class AuthError extends JobProgressError {
  override name = 'AuthError'
}

/** The job does not exist or belongs to someone else (HTTP 404, close 4003): the two look alike. */
export class NotFoundError extends JobProgressError {
  override name = 'NotFoundError'
  declare readonly jobId: string
  constructor (jobId: string, message = `Job not found or access denied: ${jobId}`) {
    super(message)
    this.jobId = jobId
  }
}

/** The job ended as `failed` or `cancelled`; `update` is its final state. */
export class JobFailedError extends JobProgressError {
  override name = 'JobFailedError'
  declare readonly update: JobUpdate
  constructor (update: JobUpdate) {
    super(update.error ?? update.status)
    this.update = update
  }

  get cancelled (): boolean {
    return this.update.status === 'cancelled'
  }
}

/** An HTTP request answered with an error status (upload refused, cancel of a finished job ...). */
export class HttpError extends JobProgressError {
  override name = 'HttpError'
  declare readonly status: number
  declare readonly body: unknown
  constructor (status: number, message: string, body?: unknown) {
    super(message)
    this.status = status
    this.body = body
  }
}

/**
 * The server refused the connection in a way a retry cannot fix (a close code `shouldRetry` says
 * no to; on SSE, 400 or 429): it ends the watches the connection carried, not the client.
 */
export class ConnectionError extends JobProgressError {
  override name = 'ConnectionError'
  /** The close code (1008 for too many connections), or the HTTP status on SSE (400, 429). */
  declare readonly code: number
  /** Why, as the server said it. */
  declare readonly reason: string
  constructor (code: number, reason: string) {
    super(`${reason} (${code})`)
    this.code = code
    this.reason = reason
  }
}
