import t from 'tap'
import { Worker } from 'bullmq'
import WebSocket from 'ws'
import { AuthError, JobFailedError, JobProgressClient, NotFoundError, type ClientOptions, type ConnectionEvent, type JobUpdate } from '../client/index'
import { jobsProtocol } from '../lib/index'
import { eventually, lines, redisFor, startApp, startWorker, upload, type RedisServer, type TestApp } from './helpers/index'

// The client in Node, against real servers: WebSocket, SSE and polling, fallback, typed errors,
// a restart of the server, cancel.

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown, redis?: RedisServer, opts: Record<string, unknown> = {}) {
  redis ??= await redisFor(t)
  const requests: string[] = []
  const app = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice', 'key-bob': 'bob' }, protocols: [jobsProtocol()], heartbeatIntervalMs: 500, ...opts }, (a) => {
    a.addHook('onRequest', async (req) => { requests.push(req.url) })
  })
  return { redis, requests, ...app }
}

function client (t: Teardown, app: TestApp, opts: Partial<ClientOptions> = {}): JobProgressClient {
  const c = new JobProgressClient({ baseUrl: app.url, apiKey: 'key-alice', WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, backoff: { minMs: 50, maxMs: 400 }, ...opts })
  t.teardown(() => c.close())
  return c
}

t.test('upload, watch over one WebSocket, async iteration to the final state with its result', async (t) => {
  const { redis, uploadDir, app, ...rest } = await setup(t)
  const c = client(t, { redis, uploadDir, app, ...rest } as unknown as TestApp)
  const states: ConnectionEvent[] = []
  c.onState(s => states.push(s))
  const progress: Array<[number, number]> = []
  const jobs = await Promise.all(Array.from({ length: 5 }, async (_, i) => await c.upload('batch', new Blob([lines(3 + i)]), { filename: `f${i}.txt`, onUploadProgress: (l, n) => progress.push([l, n]) })))
  t.ok(progress.length >= 10, 'upload progress reported')
  const watches = jobs.map(j => j.watch())
  const seen: JobUpdate[] = []
  const iterated = (async () => { for await (const u of watches[0]) seen.push(u) })()
  await eventually(() => c.state.state === 'live')
  t.equal(app.jobProgress.stats().sockets, 1, 'five jobs, one connection')
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 10 })
  const finals = await Promise.all(watches.map(async w => await w.done))
  finals.forEach((f, i) => t.match(f, { status: 'succeeded', processed: 3 + i, total: 3 + i, result: { lines: 3 + i } }))
  await iterated
  t.equal(seen.at(-1)?.status, 'succeeded', 'the iterator yields the final update and ends')
  const processed = seen.map(u => u.processed)
  t.same(processed, [...processed].sort((a, b) => a - b), 'monotonic')
  t.ok(states.some(s => s.state === 'live' && s.transport === 'websocket'))
  await eventually(() => app.jobProgress.stats().sockets === 0)
  t.equal(c.state.state, 'idle', 'nothing watched: no connection held')
})

t.test('wrong credentials: AuthError on every watch, no retry loop; a foreign job: NotFoundError', async (t) => {
  const s = await setup(t)
  const up = await upload(`${s.url}/batch/upload`, lines(1), { headers: { authorization: 'Bearer key-bob' } })
  const bad = client(t, s as unknown as TestApp, { apiKey: 'nope' })
  const before = s.requests.length
  await t.rejects(bad.watch('batch', up.body.job_id).done, AuthError)
  await t.rejects(bad.watch('batch', 'ffffffff-0000-4000-8000-000000000000').done, AuthError, 'a later watch tries again, and is refused again')
  await new Promise(resolve => setTimeout(resolve, 500))
  t.equal(s.requests.length - before, 2, 'one request per watch, no retries')

  const alice = client(t, s as unknown as TestApp)
  await t.rejects(alice.watch('batch', up.body.job_id).done, NotFoundError)
})

for (const transport of (process.env.CLIENT_ONLY !== undefined ? [process.env.CLIENT_ONLY as 'sse'] : ['sse', 'polling'] as const)) {
  t.test(`${transport} alone reaches the final state and the result; failures and cancel are typed`, async (t) => {
    const s = await setup(t)
    const c = client(t, s as unknown as TestApp, { transports: [transport], pollIntervalMs: 100 })
    const ok = await c.upload('batch', new Blob([lines(3)]))
    const failing = await c.upload('batch', new Blob([lines(3, 2)]))
    const cancelled = await c.upload('dataset', new Blob([lines(2)]))
    const [w1, w2, w3] = [ok.watch(), failing.watch(), cancelled.watch()]
    await eventually(() => c.state.state === 'fallback')
    t.equal(c.state.transport, transport)
    await c.cancel('dataset', cancelled.jobId)
    const err3 = await w3.done.catch((e: unknown) => e)
    t.ok(err3 instanceof JobFailedError && err3.cancelled, 'cancel ends the watch as cancelled')
    startWorker(t, s.redis, 'batch', s.uploadDir)
    t.match(await w1.done, { status: 'succeeded', result: { lines: 3 } })
    const err2 = await w2.done.catch((e: unknown) => e)
    t.ok(err2 instanceof JobFailedError)
    t.match((err2 as JobFailedError).update, { status: 'failed', error: 'record on line 2 is FAIL' })
  })
}

t.test('SSE: a final state whose JSON holds U+2028 or U+2029 (left raw by JSON) ends the watch with its result', async (t) => {
  const s = await setup(t)
  const c = client(t, s as unknown as TestApp, { transports: ['sse'] })
  const up = await c.upload('batch', new Blob([lines(1)]))
  const text = 'page one\u2028page two\u2029end'
  const worker = new Worker('batch', async () => ({ text }), { connection: { url: s.redis.url }, prefix: 'bull' })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  t.match(await up.watch().done, { status: 'succeeded', result: { text } })
  t.equal(c.connections, 1, 'one stream, no reconnect loop')
})

t.test('no WebSocket route: falls back to SSE after two failed attempts', async (t) => {
  const s = await setup(t)
  const c = client(t, s as unknown as TestApp, { wsPath: '/nowhere' })
  const up = await c.upload('batch', new Blob([lines(2)]))
  const w = up.watch()
  await eventually(() => c.state.transport === 'sse' && c.state.state === 'fallback', 10_000)
  startWorker(t, s.redis, 'batch', s.uploadDir)
  t.match(await w.done, { status: 'succeeded' })
  t.equal(c.connections, 3, 'two WebSocket attempts, then one stream')
})

t.test('the server restarts mid-job on the same port: reconnect with backoff, resubscribe, final state', async (t) => {
  const redis = await redisFor(t)
  const first = await setup(t, redis)
  const port = Number(new URL(first.url).port)
  const c = client(t, first as unknown as TestApp)
  const up = await c.upload('batch', new Blob([lines(30)]))
  const w = up.watch()
  const worker = startWorker(t, redis, 'batch', first.uploadDir, { delayMs: 30 })
  await new Promise<void>(resolve => w.onUpdate(u => { if (u.processed >= 3) resolve() }))
  const states: ConnectionEvent[] = []
  c.onState(st => states.push(st))
  await first.app.close()
  await eventually(() => states.some(st => st.state === 'reconnecting'))
  // A new instance on the same address, as after a deploy.
  const { buildTestApp } = await import('./helpers/client-app')
  await buildTestApp(t, redis, port, first.uploadDir, { apiKeys: { 'key-alice': 'alice' }, protocols: [jobsProtocol()] })
  t.match(await w.done, { status: 'succeeded', processed: 30, result: { lines: 30 } })
  t.ok(c.connections >= 2)
  void worker
})

t.test('clientRoute serves the built client as an ES module with an ETag', async (t) => {
  const redis = await redisFor(t)
  const { url } = await startApp(t, redis, { clientRoute: '/assets/job-progress.js' })
  const res = await fetch(`${url}/assets/job-progress.js`)
  t.equal(res.status, 200)
  t.equal(res.headers.get('content-type'), 'text/javascript; charset=utf-8')
  t.equal(res.headers.get('cache-control'), 'public, max-age=3600')
  t.match(await res.text(), /JobProgressClient/)
  const again = await fetch(`${url}/assets/job-progress.js`, { headers: { 'if-none-match': res.headers.get('etag') as string } })
  t.equal(again.status, 304)
})

t.test('an API key as the first message, or in the query', async (t) => {
  const redis = await redisFor(t)
  const s = await setup(t, redis, { protocols: [jobsProtocol({ path: '/ws/token', auth: 'first-message' }), jobsProtocol({ path: '/ws/jobs' })] })
  const byToken = client(t, s as unknown as TestApp, { wsPath: '/ws/token', apiKeyVia: 'first-message', transports: ['websocket'] })
  const byQuery = client(t, s as unknown as TestApp, { apiKeyVia: 'query', transports: ['websocket'] })
  const a = await byToken.upload('batch', new Blob([lines(2)]))
  const b = await byQuery.upload('batch', new Blob([lines(2)]))
  const [wa, wb] = [a.watch(), b.watch()]
  startWorker(t, redis, 'batch', s.uploadDir)
  t.match(await wa.done, { status: 'succeeded' })
  t.match(await wb.done, { status: 'succeeded' })
  const wrong = client(t, s as unknown as TestApp, { wsPath: '/ws/token', apiKeyVia: 'first-message', apiKey: 'nope', transports: ['websocket'] })
  await t.rejects(wrong.watch('batch', a.jobId).done, AuthError)
})

t.test('heartbeat watchdog: a connection silent for heartbeatTimeoutMs is replaced', async (t) => {
  const s = await setup(t, undefined, { heartbeatIntervalMs: 60_000 })
  const c = client(t, s as unknown as TestApp, { heartbeatTimeoutMs: 400, transports: ['websocket'] })
  const up = await c.upload('batch', new Blob([lines(1)]))
  const w = up.watch()
  const states: ConnectionEvent[] = []
  c.onState(st => states.push(st))
  t.ok(await eventually(() => c.connections >= 2, 5_000), 'reconnected after the silence')
  t.ok(states.some(st => st.state === 'reconnecting'))
  startWorker(t, s.redis, 'batch', s.uploadDir)
  t.match(await w.done, { status: 'succeeded' })
})
