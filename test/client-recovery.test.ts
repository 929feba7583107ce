import t from 'tap'
import WebSocket from 'ws'
import { AuthError, ConnectionError, JobProgressClient, Watch, type ClientOptions, type ConnectionEvent, type JobUpdate } from '../client/index'
import { jobsProtocol } from '../lib/index'
import { connect, lines, redisFor, startApp, startWorker, upload, type TestApp } from './helpers/index'

// The client recovers: a refusal ends the watches it concerns and says why, and the same client
// object's next watch tries again (new credentials, a new session; after a backoff when there were
// too many connections). Its view of a job is ordered by version where there is one.

interface Teardown { teardown: (fn: () => unknown) => void }

function client (t: Teardown, app: TestApp, opts: Partial<ClientOptions> = {}): JobProgressClient {
  const c = new JobProgressClient({ baseUrl: app.url, apiKey: 'key-alice', WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, backoff: { minMs: 50, maxMs: 400 }, ...opts })
  t.teardown(() => c.close())
  return c
}

for (const transport of ['websocket', 'sse'] as const) {
  t.test(`${transport}: after a 401 the same client's next watch succeeds once the credentials are valid`, async (t) => {
    const redis = await redisFor(t)
    let valid = true
    const app = await startApp(t, redis, { apiKeys: (key: string) => valid && key === 'key-alice' ? 'alice' : null, protocols: [jobsProtocol()] })
    const up = await upload(`${app.url}/batch/upload`, lines(2), { headers: { authorization: 'Bearer key-alice' } })
    valid = false
    const c = client(t, app, { transports: [transport] })
    const refused = await c.watch('batch', up.body.job_id).done.catch((e: unknown) => e)
    t.ok(refused instanceof AuthError, 'the watch ends with AuthError')
    t.match((refused as Error).message, /invalid API key|authentication/, 'and says why')
    valid = true
    startWorker(t, redis, 'batch', app.uploadDir)
    t.match(await c.watch('batch', up.body.job_id).done, { status: 'succeeded', processed: 2 }, 'the next watch connects again and reaches the final state')
  })
}

t.test('too many connections (1008): the watch ends with the code and reason; the next one connects after a backoff', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice' }, protocols: [jobsProtocol()], maxConnectionsPerOwner: 1 })
  const up = await upload(`${app.url}/batch/upload`, lines(2), { headers: { authorization: 'Bearer key-alice' } })
  const holder = connect(t, `${app.ws}/ws/jobs?api_key=key-alice`)
  await holder.waitFor(m => m.type === 'connected')
  const c = client(t, app, { transports: ['websocket'], backoff: { minMs: 3_000, maxMs: 3_000 } })
  const states: ConnectionEvent[] = []
  c.onState(s => states.push(s))
  const refused = await c.watch('batch', up.body.job_id).done.catch((e: unknown) => e)
  t.ok(refused instanceof ConnectionError, 'ConnectionError')
  t.match(refused, { code: 1008, reason: /too many connections/ })
  // A backoff of 3 s and a check for at least 1 s of it left: closing the holder can take a
  // while on a loaded machine, and the wait counts from the refusal.
  holder.close()
  await holder.closed
  const at = states.length
  const connections = c.connections
  const again = c.watch('batch', up.body.job_id)
  t.equal(c.connections, connections, 'not at once')
  t.ok(states.slice(at).some(s => s.state === 'reconnecting' && (s.retryInMs ?? 0) >= 1_000), 'it waits out a backoff first')
  startWorker(t, redis, 'batch', app.uploadDir)
  t.match(await again.done, { status: 'succeeded' }, 'then connects and reaches the final state')
})

t.test('a watch orders states by version where both have one, and as before where one has none', async (t) => {
  const u = (status: JobUpdate['status'], processed: number, version?: string, stage?: string): JobUpdate =>
    ({ kind: 'batch', jobId: 'j', status, progress: 0, processed, total: 5, etaSeconds: null, result: null, error: null, ...(version !== undefined && { version }), ...(stage !== undefined && { stage }) })
  const rows: Array<[string, JobUpdate, JobUpdate, boolean]> = [
    ['a second stage whose counts restart, newer version', u('running', 5, '1.100-0', 'parse'), u('running', 0, '1.200-0', 'check'), true],
    ['an older version, more processed', u('running', 2, '1.200-0'), u('running', 4, '1.100-0'), false],
    ['a retry: a newer attempt at a later entry', u('running', 5, '1.100-0'), u('running', 0, '2.300-0'), true],
    ['a final with a newer version', u('running', 5, '1.100-0'), u('succeeded', 5, '1.200-0'), true],
    ['a final with an older version', u('running', 5, '1.200-0'), u('failed', 1, '1.100-0'), false],
    ['no versions: less processed, same status', u('running', 5), u('running', 3), false],
    ['no versions: more processed', u('running', 3), u('running', 5), true],
    ['no versions: another status', u('running', 5), u('queued', 0), true],
    ['no versions: a final', u('running', 5), u('failed', 1), true],
    ['one version only: ordered as before', u('running', 5, '1.100-0'), u('running', 3), false]
  ]
  for (const [name, held, next, accepted] of rows) {
    const w = new Watch('batch', 'j', () => {}, () => {})
    w._update(held)
    t.equal(w._update(next), accepted, name)
    t.equal(w.current, accepted ? next : held, `${name}: the state held`)
  }
})
