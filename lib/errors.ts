import createError from '@fastify/error'

/**
 * Every error the plugin raises, with its code and HTTP status. Users can
 * `instanceof` them (`err instanceof errors.JobNotFoundError`); the README lists them.
 */

// Registration
export const InvalidOptionError = createError('FST_JP_INVALID_OPTION', 'fastify-job-progress: %s', 500, TypeError)

// Who is asking
export const UnauthorizedError = createError('FST_JP_UNAUTHORIZED', 'Authentication required: %s', 401)

// Jobs
export const JobNotFoundError = createError('FST_JP_JOB_NOT_FOUND', 'Job not found or access denied', 404)
export const JobNotCompleteError = createError('FST_JP_JOB_NOT_COMPLETE', 'Job has no result: its status is %s', 409)
export const JobFinishedError = createError('FST_JP_JOB_FINISHED', 'Job cannot be cancelled: its status is already %s', 409)
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

// Webhooks
export const WebhookUrlRefusedError = createError('FST_JP_WEBHOOK_URL_REFUSED', 'The webhook URL is refused: %s', 400)
export const WebhookForbiddenError = createError('FST_JP_WEBHOOK_FORBIDDEN', 'Not allowed to manage webhook deliveries', 403)
export const DeliveryNotFoundError = createError('FST_JP_DELIVERY_NOT_FOUND', 'No dead webhook delivery with this id', 404)

/** WebSocket close codes the plugin uses; 1xxx are standard, 4xxx are ours. */
export const CloseCodes = {
  normal: 1000,
  goingAway: 1001,
  unsupportedData: 1003,
  policyViolation: 1008,
  tooBig: 1009,
  tryAgainLater: 1013,
  unauthorized: 4001,
  forbidden: 4003
} as const

/** The close reason for a job that is missing or belongs to someone else: the two look alike on purpose. */
export const NOT_FOUND_REASON = 'job not found or access denied'
