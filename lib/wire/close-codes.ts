/**
 * Every close code the plugin sends, with the reason a person reads and whether a client should
 * reconnect. The server and the client import this one table, so a client never retries what
 * cannot succeed (wrong credentials, a job it may not see) and always retries what can.
 *
 * This module has no server dependencies.
 */
export const CloseCodes = {
  normal: 1000,
  goingAway: 1001,
  protocolError: 1002,
  unsupportedData: 1003,
  invalidData: 1007,
  policyViolation: 1008,
  tooBig: 1009,
  internalError: 1011,
  tryAgainLater: 1013,
  unauthorized: 4001,
  forbidden: 4003,
  /** The client left more unread data queued than the per-connection byte limit allows. */
  slowClient: 4008
} as const

export type CloseCode = typeof CloseCodes[keyof typeof CloseCodes]

export interface CloseAdvice {
  /** The reason sent when the code is used without a more precise one. */
  reason: string
  /** Whether a client should reconnect (with backoff) after this close. */
  retry: boolean
  /**
   * The HTTP status the close becomes where a connection can still answer with one (an SSE
   * stream that has sent nothing yet: EventSource stops on any non-200). @default 500
   */
  http?: number
}

/** The default reason and the retry advice of each code. */
export const CLOSE_ADVICE: Readonly<Record<number, CloseAdvice>> = {
  1000: { reason: 'done', retry: false },
  1001: { reason: 'server shutting down', retry: true, http: 503 },
  1002: { reason: 'WebSocket protocol error', retry: true },
  1003: { reason: 'unsupported data', retry: false },
  1006: { reason: 'connection lost', retry: true },
  1007: { reason: 'invalid UTF-8 in a text message', retry: false },
  1008: { reason: 'policy violation', retry: false, http: 429 },
  1009: { reason: 'message too big', retry: false },
  1011: { reason: 'internal server error', retry: true },
  1013: { reason: 'temporarily unavailable, try again', retry: true, http: 503 },
  4001: { reason: 'authentication required', retry: false, http: 401 },
  4003: { reason: 'job not found or access denied', retry: false, http: 404 },
  4008: { reason: 'client is not reading its messages', retry: true }
}

/** The HTTP status a close with `code` becomes before anything was streamed (see {@link CloseAdvice.http}). */
export function httpStatus (code: number): number {
  return CLOSE_ADVICE[code]?.http ?? 500
}

/** The close reason for a job that is missing or belongs to someone else: the two look alike on purpose. */
export const NOT_FOUND_REASON = 'job not found or access denied'

/**
 * Whether a client should reconnect after a close with `code`. Unknown codes are retried: a
 * client that gives up on a code it does not know would stop for good on a transient fault.
 */
export function shouldRetry (code: number): boolean {
  // A set of its own, not a lookup in CLOSE_ADVICE: a client that only needs this leaves the
  // reasons out of its bundle.
  return !NO_RETRY.has(code)
}

const NO_RETRY = new Set([1000, 1003, 1007, 1008, 1009, 4001, 4003])

// Pure: a client bundle that never calls closeReason leaves it out.
const encoder = /* @__PURE__ */ new TextEncoder()

/**
 * A close reason must fit in 123 bytes of UTF-8, may not be empty for a person to understand it,
 * and error texts may quote what a client sent: cut to fit, and fall back to the code's reason.
 */
export function closeReason (code: number, text?: string): string {
  let reason = text === undefined || text === '' ? CLOSE_ADVICE[code]?.reason ?? 'closed' : text.slice(0, 123)
  while (encoder.encode(reason).length > 123) reason = reason.slice(0, -1)
  return reason
}
