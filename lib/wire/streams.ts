/**
 * Named streams of a job (chunks a worker writes, addressed by absolute offset): the relay format
 * on the job's channel and the messages watchers get, shared by the server and the client.
 */

/** A stream's name: letters, digits, `.`, `_`, `-`, at most 64 characters, not starting with `.`. */
export const STREAM_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/

export function isStreamName (name: unknown): name is string {
  return typeof name === 'string' && STREAM_NAME.test(name)
}

/** Why a stream ended: the writer ended it, or a limit was reached (nothing more is stored). */
export type StreamEndReason = 'done' | 'limit'

/** A chunk: `offset` is its absolute place in the stream, from 0. */
export interface StreamChunkMessage { type: 'stream', job_id: string, name: string, offset: number, chunk: unknown, ts: number }
/** The stream has `offset` chunks and no more will come; `message` says which limit on `limit`. */
export interface StreamEndMessage { type: 'stream_end', job_id: string, name: string, offset: number, reason: StreamEndReason, message?: string, ts: number }
/** Chunks `from`..`next - 1` were not sent: read them from the stream route; `next` on follow. */
export interface StreamTruncatedMessage { type: 'stream_truncated', job_id: string, name: string, from: number, next: number, ts: number }
export type StreamMessage = StreamChunkMessage | StreamEndMessage | StreamTruncatedMessage

/**
 * Every stream relay message starts with this exactly, so the hub tells it from a state message
 * without parsing. `n` the name, `o` the offset; `c` the chunk as JSON, or `end` and `m` for the
 * end marker (`o` then the chunk count).
 */
export const STREAM_PREFIX = '{"v":3,"e":"stream",'

/** A chunk's relay message, split where its offset goes (the writer's script splices it in). */
export function streamMessageParts (name: string, json: string): [head: string, tail: string] {
  return [`${STREAM_PREFIX}"n":${JSON.stringify(name)},"o":`, `,"c":${json}}`]
}

/** The end marker's relay message, split where the chunk count goes. */
export function streamEndParts (name: string, reason: StreamEndReason, message?: string): [head: string, tail: string] {
  return [`${STREAM_PREFIX}"n":${JSON.stringify(name)},"end":"${reason}",${message !== undefined ? `"m":${JSON.stringify(message)},` : ''}"o":`, '}']
}

export type StreamRelay =
  | { name: string, offset: number, chunk: unknown }
  | { name: string, offset: number, end: StreamEndReason, message?: string }

/** Reads a stream relay message; null for anything else or malformed. */
export function parseStreamRelay (raw: string): StreamRelay | null {
  if (!raw.startsWith(STREAM_PREFIX)) return null
  let m: Record<string, unknown>
  try {
    m = JSON.parse(raw)
  } catch {
    return null
  }
  if (typeof m.n !== 'string' || typeof m.o !== 'number' || !Number.isSafeInteger(m.o) || m.o < 0) return null
  if (m.end === 'done' || m.end === 'limit') return { name: m.n, offset: m.o, end: m.end, ...(typeof m.m === 'string' ? { message: m.m } : {}) }
  return 'c' in m ? { name: m.n, offset: m.o, chunk: m.c } : null
}

/** The version part of a chunk's SSE id, `<jobId>@stream.<name>.<offset>`: its own namespace, apart from `log.` and versions. */
export const STREAM_ID = 'stream.'

export function streamEventId (name: string, offset: number): string {
  return `${STREAM_ID}${name}.${offset}`
}

/** The stream and next offset named by a Last-Event-ID `<jobId>@stream.<name>.<offset>`, or null. */
export function streamResume (lastEventId: string | undefined, jobId: string): { name: string, from: number } | null {
  const prefix = `${jobId}@${STREAM_ID}`
  if (lastEventId === undefined || !lastEventId.startsWith(prefix)) return null
  const rest = lastEventId.slice(prefix.length)
  const dot = rest.lastIndexOf('.')
  const name = rest.slice(0, dot)
  const n = Number(rest.slice(dot + 1))
  return dot > 0 && isStreamName(name) && Number.isSafeInteger(n) && n >= 0 ? { name, from: n + 1 } : null
}
