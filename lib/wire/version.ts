/**
 * The continuity contract: every message of the plugin's own protocols and of SSE carries the
 * job's version, so a client on any transport, after any reconnect, can tell whether a message is
 * newer than what it holds, stale, or whether it must re-read.
 *
 * A version is `<attempt>.<stream entry id>`, for example `2.1700000000000-3`: the job's attempt
 * (1 for the first) and the id of the entry in the queue's BullMQ event stream that produced the
 * state (`0-0` for a state read before any event was seen). Entry ids grow within a queue (the
 * bridge keeps them from going back when a stream is made again: docs/architecture.md, "When
 * entry ids go back"), so a larger id is a later state, whatever the attempt says.
 *
 * This module has no server dependencies: the server and the client import it alike.
 */
export type Version = string

/** The version of a state that no stream entry explains yet (a snapshot of a quiet job). */
export const NO_ENTRY = '0-0'

export interface ParsedVersion {
  attempt: number
  /** Milliseconds part of the stream entry id. */
  ms: number
  /** Sequence part of the stream entry id. */
  seq: number
}

/** Builds a version from an attempt and a stream entry id (`<ms>-<seq>`). */
export function formatVersion (attempt: number, entryId: string = NO_ENTRY): Version {
  return `${attempt}.${entryId}`
}

/** Reads a version back; null for anything that is not one. */
export function parseVersion (version: unknown): ParsedVersion | null {
  if (typeof version !== 'string') return null
  const m = /^(\d+)\.(\d+)-(\d+)$/.exec(version)
  if (m === null) return null
  return { attempt: Number(m[1]), ms: Number(m[2]), seq: Number(m[3]) }
}

/** Orders two stream entry ids (`<ms>-<seq>`): negative, zero or positive. */
export function compareEntryIds (a: string, b: string): number {
  // Once per relayed message: no arrays, no regular expression.
  const ad = a.indexOf('-')
  const bd = b.indexOf('-')
  return Number(ad < 0 ? a : a.slice(0, ad)) - Number(bd < 0 ? b : b.slice(0, bd)) ||
    (ad < 0 ? 0 : Number(a.slice(ad + 1))) - (bd < 0 ? 0 : Number(b.slice(bd + 1)))
}

/**
 * Orders two versions: negative when `a` is older than `b`, zero when equal, positive when
 * newer. An unparsable version sorts before every valid one. The stream entry id decides, the
 * attempt only between equal ids: a snapshot infers its attempt (a queued job, or an active one
 * whose lock lapsed, is shown with its next attempt) while events of the real attempt, with
 * larger entry ids, may still come; ordered attempt first they would be dropped.
 */
export function compareVersions (a: Version, b: Version): number {
  const pa = parseVersion(a)
  const pb = parseVersion(b)
  if (pa === null || pb === null) return (pa === null ? 0 : 1) - (pb === null ? 0 : 1)
  return pa.ms - pb.ms || pa.seq - pb.seq || pa.attempt - pb.attempt
}
