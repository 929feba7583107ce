/**
 * What a worker may report beside the counts: `job.updateProgress({ processed, total, stage,
 * message, data })`. Every instance reads the same progress value, so the limits are applied
 * where it is read, alike everywhere: a long `message` is cut, an oversized `data` is dropped,
 * and the counts themselves always go through.
 */
export interface ProgressDetails {
  /** A short name of the step the job is in (`parsing`, `checking`). */
  stage?: string
  /** A line for a person (`checking 1,204 molecules`). */
  message?: string
  /** Small JSON for the page (a chart point, a counter). */
  data?: unknown
}

/** The limits, in characters of `stage` and `message` and bytes of `data` as JSON. */
export const DETAIL_LIMITS = { stage: 64, message: 1024, dataBytes: 4096 } as const

/** What was cut or dropped, for a log line that says so. */
export type Clipped = Array<'stage' | 'message' | 'data'>

/** The details of a BullMQ progress value (a number has none); `clipped` names what the limits changed. */
export function progressDetails (value: unknown, clipped?: Clipped): ProgressDetails {
  const details: ProgressDetails = {}
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return details
  const { stage, message, data } = value as Record<string, unknown>
  if (typeof stage === 'string' && stage !== '') {
    details.stage = stage.length > DETAIL_LIMITS.stage ? stage.slice(0, DETAIL_LIMITS.stage) : stage
    if (stage.length > DETAIL_LIMITS.stage) clipped?.push('stage')
  }
  if (typeof message === 'string' && message !== '') {
    // Cut at a character, not inside a surrogate pair, and say it was cut.
    details.message = message.length > DETAIL_LIMITS.message ? `${Array.from(message.slice(0, DETAIL_LIMITS.message - 1)).join('')}…` : message
    if (message.length > DETAIL_LIMITS.message) clipped?.push('message')
  }
  if (data !== undefined && data !== null) {
    const size = Buffer.byteLength(JSON.stringify(data) ?? '')
    if (size <= DETAIL_LIMITS.dataBytes) details.data = data
    else clipped?.push('data')
  }
  return details
}

/** Whether two events' details differ, so an update that changes only the stage or message is not dropped as stale. */
export function detailsDiffer (a: ProgressDetails, b: ProgressDetails): boolean {
  if (a.stage !== b.stage || a.message !== b.message) return true
  if (a.data === b.data) return false
  return JSON.stringify(a.data) !== JSON.stringify(b.data)
}

/** The details as message fields: absent when not reported, so messages without them stay as they were. */
export function detailFields (details: ProgressDetails): ProgressDetails {
  return {
    ...(details.stage !== undefined ? { stage: details.stage } : {}),
    ...(details.message !== undefined ? { message: details.message } : {}),
    ...(details.data !== undefined ? { data: details.data } : {})
  }
}
