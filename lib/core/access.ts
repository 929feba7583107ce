import type { FastifyRequest } from 'fastify'

/** What a request may want to do with a job: one per route, and `watch` for sockets and SSE. */
export type JobAction = 'watch' | 'status' | 'result' | 'cancel' | 'delete' | 'logs' | 'output'

/** The job as the access policy sees it. */
export interface AccessJob {
  kind: string
  jobId: string
  /** Who created it (`data.owner`). */
  owner: string
  /**
   * Always null: the policy decides on the owner alone, so nothing of somebody else's job is read
   * before it did (a job of somebody else and a missing one then cost the same). Kept so that
   * policies written for earlier versions still compile.
   * @deprecated read what the policy needs from the request, or keep it with the owner's name.
   */
  data: Record<string, unknown> | null
}

/**
 * The access policy (`canAccess` option): whether `requester` (the owner the request
 * authenticates as) may take `action` on `job`. A refusal is answered exactly like a missing job
 * (404, or close 4003 / an error message on sockets), so job ids leak nothing.
 */
export type CanAccess = (request: FastifyRequest, job: AccessJob, action: JobAction, requester: string) => boolean | Promise<boolean>

/** The default: only the job's owner. */
export const ownerOnly: CanAccess = (_request, job, _action, requester) => job.owner === requester

/** Runs the policy; a policy that throws refuses (and is logged), it never lets a request in. */
export async function allowed (policy: CanAccess, request: FastifyRequest, job: AccessJob, action: JobAction, requester: string): Promise<boolean> {
  if (job.owner === requester) return true
  try {
    return await policy(request, job, action, requester) === true
  } catch (err) {
    request.log.warn({ err }, 'job-progress: the canAccess policy threw; access refused')
    return false
  }
}

/** Why a request or connection with a session past its max age is refused, or closed. */
export const SESSION_EXPIRED = 'session expired; upload again to start a new session'
/** Why a connection watching with a watch token past its expiry is closed. */
export const TOKEN_EXPIRED = 'watch token expired; ask the owner for a new one'

/** Who is asking, and how we know. */
export interface Identity {
  owner: string
  via: 'session' | 'apiKey' | 'custom' | 'token'
  /**
   * For a watch token: the one job it allows, or null for a token that is forged, expired or
   * malformed (it then allows nothing, and is answered like an unknown job).
   */
  job?: { kind: string, jobId: string } | null
  /**
   * When the credential stops being valid (ms since the epoch): a session past `maxAgeSeconds`,
   * a watch token past its expiry. A connection authenticated with it is closed then.
   */
  expiresAt?: number
}

/** Whether `identity` may read the job `kind`/`jobId` whose recorded owner is `owner`. */
export function mayRead (identity: Identity, kind: string, jobId: string, owner: string | null | undefined): boolean {
  if (owner === null || owner === undefined || identity.owner !== owner) return false
  if (identity.via !== 'token') return true
  return identity.job !== null && identity.job !== undefined && identity.job.kind === kind && identity.job.jobId === jobId
}

/**
 * How a request says who it is, as sessions need it: the routes' `Owners` (http/auth) implements
 * it, so a session knows no route.
 */
export interface Authenticator {
  /** Null when the request carries no credentials; throws when it carries wrong ones. */
  fromRequest: (request: FastifyRequest, websocket?: boolean, watch?: boolean) => Promise<Identity | null>
  /** Whether a cookie- or token-authenticated request comes from an allowed origin. */
  originAllowed: (request: FastifyRequest) => boolean
  /** The owner behind an API key, or null when the key is unknown. */
  ownerOfKey: (key: string) => Promise<string | null>
}
