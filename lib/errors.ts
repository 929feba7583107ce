import createError from '@fastify/error'

/**
 * Every error the plugin raises, with its code and HTTP status. Users can
 * `instanceof` them (`err instanceof errors.JobNotFoundError`); the README lists them.
 */

// Registration
export const InvalidOptionError = createError('FST_JP_INVALID_OPTION', 'fastify-job-progress: %s', 500, TypeError)
export const RouteTakenError = createError('FST_JP_ROUTE_TAKEN', 'fastify-job-progress: the app already has a route %s %s; %s', 500)

// Who is asking
export const UnauthorizedError = createError('FST_JP_UNAUTHORIZED', 'Authentication required: %s', 401)

// Jobs
export const JobNotFoundError = createError('FST_JP_JOB_NOT_FOUND', 'Job not found or access denied', 404)
export const JobNotCompleteError = createError('FST_JP_JOB_NOT_COMPLETE', 'Job has no result: its status is %s', 409)
export const JobFinishedError = createError('FST_JP_JOB_FINISHED', 'Job cannot be cancelled: its status is already %s', 409)
export const JobIdTooLongError = createError('FST_JP_JOB_ID_TOO_LONG', 'Job id too long: job ids are UUIDs, and no id longer than %s characters is accepted', 400)
export const InvalidListQueryError = createError('FST_JP_INVALID_LIST_QUERY', 'Invalid jobs list query: %s', 400)
export const QueueUnavailableError = createError('FST_JP_QUEUE_UNAVAILABLE', 'The job queue is unavailable (Redis unreachable); try again later', 503)

// Uploads
export const NoFileError = createError('FST_JP_NO_FILE', 'No file uploaded: send one file in a multipart/form-data request', 400)
export const EmptyFileError = createError('FST_JP_EMPTY_FILE', 'The uploaded file "%s" is empty', 400)
export const FileTooLargeError = createError('FST_JP_FILE_TOO_LARGE', 'The uploaded file is larger than the limit of %s bytes', 413)
export const TooManyFilesError = createError('FST_JP_TOO_MANY_FILES', 'Only one file may be uploaded per request', 413)
export const UnsupportedFileTypeError = createError('FST_JP_UNSUPPORTED_FILE_TYPE', 'Files of type "%s" are not accepted here; accepted: %s', 415)
export const TooManyPartsError = createError('FST_JP_TOO_MANY_PARTS', 'The form has too many parts: at most %s (fields and files together)', 413)
export const TooManyFieldsError = createError('FST_JP_TOO_MANY_FIELDS', 'The form has too many fields: at most %s', 413)
export const NotMultipartError = createError('FST_JP_NOT_MULTIPART', 'Uploads must be sent as multipart/form-data', 415)
export const FieldTooLargeError = createError('FST_JP_FIELD_TOO_LARGE', 'The form field "%s" is longer than the limit of %s bytes', 413)
export const MalformedMultipartError = createError('FST_JP_MALFORMED_MULTIPART', 'Malformed multipart/form-data body: %s', 400)
export const UploadIdleError = createError('FST_JP_UPLOAD_IDLE', 'The upload sent no data for %s ms: it was ended and its partial file removed; send it again', 408)
export const UploadTimeoutError = createError('FST_JP_UPLOAD_TIMEOUT', 'The upload took longer than %s ms: it was ended and its partial file removed; send it again', 408)
export const UploadTooSlowError = createError('FST_JP_UPLOAD_TOO_SLOW', 'The upload sent less than %s bytes per second over %s ms: it was ended and its partial file removed; send it again over a faster link', 408)
export const UploadShutdownError = createError('FST_JP_SHUTTING_DOWN', 'The server is shutting down: the upload was ended and its partial file removed; send it again', 503)

// Webhooks
export const WebhookUrlRefusedError = createError('FST_JP_WEBHOOK_URL_REFUSED', 'The webhook URL is refused: %s', 400)
export const WebhookForbiddenError = createError('FST_JP_WEBHOOK_FORBIDDEN', 'Not allowed to manage webhook deliveries', 403)
export const DeliveryNotFoundError = createError('FST_JP_DELIVERY_NOT_FOUND', 'No dead webhook delivery with this id', 404)

/** WebSocket close codes and their reasons live in the wire module, shared with the client. */
export { CloseCodes, NOT_FOUND_REASON } from './wire/close-codes'

// Creating jobs: JSON, idempotency keys, quotas
export const InvalidFileReferenceError = createError('FST_JP_INVALID_FILE_REFERENCE', 'The file reference is refused: %s', 400)
export const IdempotencyKeyInvalidError = createError('FST_JP_IDEMPOTENCY_KEY_INVALID', 'Idempotency-Key must be 1 to 255 printable ASCII characters', 400)
export const IdempotencyKeyInProgressError = createError('FST_JP_IDEMPOTENCY_KEY_IN_PROGRESS', 'A request with this Idempotency-Key is still being processed; retry in a moment', 409)
export const IdempotencyKeyReusedError = createError('FST_JP_IDEMPOTENCY_KEY_REUSED', 'This Idempotency-Key was already used with a different request body; use a new key for a new request', 422)
export const QuotaExceededError = createError('FST_JP_QUOTA_EXCEEDED', 'Quota exceeded: %s; retry after the time in Retry-After', 429)

// Deleting jobs and their outputs
export const OutputNotFoundError = createError('FST_JP_OUTPUT_NOT_FOUND', 'No output file of this name', 404)
export const InvalidOutputNameError = createError('FST_JP_INVALID_OUTPUT_NAME', 'Invalid output name "%s": use letters, digits, ".", "_" or "-" (at most 100)', 500, TypeError)
export const RangeNotSatisfiableError = createError('FST_JP_RANGE_NOT_SATISFIABLE', 'The requested range is outside the file (%s bytes)', 416)
