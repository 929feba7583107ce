import type { JobStatus, JobUpdateMessage, ProgressMessage } from '../lib/wire/messages'
import { NotFoundError } from './errors'
import { authError, type Env, type Link } from './link'

type Timer = ReturnType<typeof setTimeout> | undefined

/** The status route's seed statuses in the `jobs` protocol's words (`failed` and `cancelled` are the same). */
const POLL_STATUS: Record<string, JobStatus> = { processing: 'running', complete: 'succeeded' }

/**
 * The status route of each job every `pollIntervalMs`, which always works (and the lists of the
 * caller's jobs read each round). Loaded when first used (the last fallback).
 */
export function polling (l: Link, o: Env): void {
  let timer: Timer
  const round = async (): Promise<void> => {
    for (const [jobId, kind] of [...l.w_]) {
      if (l.ended_) return
      if (!jobId) {
        // No feed here: each round reads the lists again.
        l.live_()
        o.feeds_.forEach(f => f._sync())
        continue
      }
      let res: Response
      try { res = await o.request_(o.route_('status', kind, jobId)) } catch { return l.end_(null) }
      if (l.ended_) return
      if (res.status === 404) {
        l.w_.delete(jobId)
        o.watches_.get(jobId)?._end(new NotFoundError(jobId))
        continue
      }
      if (res.status !== 200) return l.end_(res.status === 401 ? authError() : null)
      let p: ProgressMessage
      try { p = await res.json() } catch { return l.end_(null) }
      let result: unknown = null
      if (p.status === 'complete') {
        try {
          result = (await (await o.request_(o.route_('result', kind, jobId))).json()).result ?? null
        } catch {}
      }
      if (l.ended_) return
      l.live_()
      l.touch_()
      o.update_({ ...p, status: POLL_STATUS[p.status] ?? p.status, result, error: p.error ?? null } as unknown as JobUpdateMessage)
      if (p.status !== 'processing') l.w_.delete(jobId)
    }
    if (!l.ended_) timer = setTimeout(round, o.pollMs_)
  }
  l.stop_ = () => clearTimeout(timer)
  void round()
}
