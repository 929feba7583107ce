import t from 'tap'
import { Watch } from '../client/index'
import type { JobUpdate } from '../client/types'
import type { JobEvent } from '../lib/core/event'
import { jobUpdate } from '../lib/protocols/jobs'
import { progressMessage, progressProtocol } from '../lib/protocols/progress'
import { sseProtocol } from '../lib/protocols/sse-protocol'

// The version on the wire, table by table: where it appears, where it must not, and how the
// client orders what it receives.

const event = (over: Partial<JobEvent> = {}): JobEvent => ({ kind: 'batch', jobId: 'j', state: 'active', processed: 2, total: 4, attempt: 1, etaSeconds: 3, ts: 1_700_000_000_000, ...over })

t.test('renderers: version where the contract says, seed 000 exact by default', async (t) => {
  const rows: Array<[string, unknown, unknown]> = [
    ['jobs, with version', jobUpdate(event({ version: '1.5-0' })).version, '1.5-0'],
    ['jobs, without', 'version' in jobUpdate(event()), false],
    ['seed 000 default', 'version' in (progressProtocol('/ws').render(event({ version: '1.5-0' })) as object), false],
    ['seed 000 with the option', (progressProtocol('/ws', { version: true }).render(event({ version: '1.5-0' })) as { version?: string }).version, '1.5-0'],
    ['seed 000 with the option, no version known', 'version' in (progressProtocol('/ws', { version: true }).render(event()) as object), false],
    ['seed 000 fields', Object.keys(progressMessage(event({ version: '1.5-0' }))).sort(), ['eta_seconds', 'job_id', 'processed', 'progress', 'status', 'total']],
    ['sse id from version', /^id: j@1\.5-0\n/.test(sseProtocol(true).render(event({ version: '1.5-0' })) as string), true],
    ['sse id without version', /^id: j@1\.active\.2\n/.test(sseProtocol(true).render(event()) as string), true]
  ]
  for (const [name, got, want] of rows) t.same(got, want, name)
})

t.test('client Watch: stale by version dropped, progress never back, nothing after a final', async (t) => {
  const w = new Watch('batch', 'j', () => {})
  const u = (over: Partial<JobUpdate>): JobUpdate => ({ kind: 'batch', jobId: 'j', status: 'running', progress: 0, processed: 0, total: 4, etaSeconds: null, result: null, error: null, ...over })
  const rows: Array<[string, JobUpdate, boolean]> = [
    ['first', u({ processed: 1, version: '1.10-0' }), true],
    ['older version', u({ processed: 2, version: '1.9-0' }), false],
    ['newer', u({ processed: 2, version: '1.11-0' }), true],
    ['progress back without versions', u({ processed: 1 }), false],
    ['retry: new attempt', u({ processed: 0, version: '2.12-0' }), true],
    ['final', u({ status: 'succeeded', processed: 4, result: { ok: 1 }, version: '2.20-0' }), true],
    ['after the final', u({ status: 'running', processed: 4, version: '2.30-0' }), false]
  ]
  for (const [name, update, accepted] of rows) t.equal(w._update(update), accepted, name)
  t.match(await w.done, { status: 'succeeded', result: { ok: 1 } })
})
