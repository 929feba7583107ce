import type { FastifyRequest } from 'fastify'
import { allowed, ownerOnly, type CanAccess, type Identity } from '../core/access'
import type { SnapshotTarget } from '../core/snapshot'

/** What locating a job reads of the jobs' context (a slice of `JobsContext`). */
export interface LocateContext {
  queueOf: (kind: string) => string | undefined
  kinds: Array<{ kind: string, queue: string }>
  ownersOf: (targets: SnapshotTarget[]) => Promise<Array<string | null | Error>>
  canAccess: CanAccess
}

/** What locating a job reads of the connection. */
export interface LocateConnection {
  readonly identity: Identity | null
  readonly request: FastifyRequest | null
}

/** Where a job may be (one target per kind it may be of) and the owner it must have. */
export interface Located { targets: SnapshotTarget[], expected: string }

/** Whether {@link locate} answers without reading anything: a watch token, or the default policy. */
export function quickly (ctx: LocateContext, c: LocateConnection): boolean {
  return c.identity?.via === 'token' || ctx.canAccess === ownerOnly
}

/**
 * Where the job may be and whose it must be for the hub to open it, or null (not found). A job
 * of somebody else and one that does not exist cost the same Redis commands. With the default
 * policy, nothing is read here (and nothing awaited): every kind the job may be of is opened at
 * once (the hub's read checks the owner before it reads the job), so a bare job id on several
 * kinds costs the SUBSCRIBE and the batched read of any open, not a lookup before them. With a
 * policy of the application's, one round trip first: each kind's owner read alone, the kind
 * found where the policy lets the requester in.
 */
export function locate (ctx: LocateContext, c: LocateConnection, jobId: string, kind: string | undefined, requester: string): Located | null | Promise<Located | null> {
  const identity = c.identity
  const token = identity?.via === 'token'
  // A watch token grants its one job and nothing else, whatever the job.
  if (token && (identity?.job === null || identity?.job === undefined || (kind !== undefined && identity.job.kind !== kind) || identity.job.jobId !== jobId)) return null
  const named = kind ?? (token ? identity?.job?.kind : undefined)
  const targets: SnapshotTarget[] = []
  if (named === undefined) {
    for (const k of ctx.kinds) targets.push({ kind: k.kind, queue: k.queue, jobId })
  } else {
    const queue = ctx.queueOf(named)
    if (queue !== undefined) targets.push({ kind: named, queue, jobId })
  }
  if (targets.length === 0) return null
  if (quickly(ctx, c)) return { targets, expected: requester }
  return byPolicy(ctx, c, targets, jobId, requester)
}

async function byPolicy (ctx: LocateContext, c: LocateConnection, targets: SnapshotTarget[], jobId: string, requester: string): Promise<Located | null> {
  const owners = await ctx.ownersOf(targets)
  for (const owner of owners) if (owner instanceof Error) throw owner
  const i = owners.findIndex(o => typeof o === 'string')
  if (i < 0) return null
  const owner = owners[i] as string
  if (!await allowed(ctx.canAccess, c.request as FastifyRequest, { kind: targets[i].kind, jobId, owner, data: null }, 'watch', requester)) return null
  return { targets: [targets[i]], expected: owner }
}
