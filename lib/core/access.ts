import type { FastifyRequest } from 'fastify'

/** What a request may want to do with a job: one per route, and `watch` for sockets and SSE. */
export type JobAction = 'watch' | 'status' | 'result' | 'cancel' | 'delete' | 'logs' | 'output'

/** The job as the access policy sees it. */
export interface AccessJob {
  kind: string
  jobId: string
  /** Who created it (`data.owner`). */
  owner: string
  /** The job's data as stored at creation, when it was read (null for a cancelled or deleted job). */
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
