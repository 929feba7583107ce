import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { defineProtocol, jobsProtocol, type JobProgressOptions } from '../lib/index'
import { connect, lines, redisFor, startApp, startWorker, upload, type Client } from './helpers/index'

// The `jobs` protocol (seed 002): one socket, many subscriptions, typed events with an integer
// Unix `ts`, API keys, errors the connection survives, and the limits.

const KEYS = { 'key-alice': 'alice', 'key-bob': 'bob' }
const PATH = '/api/v1/ws/jobs'

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown, opts: Partial<JobProgressOptions> = {}) {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: KEYS, protocols: [jobsProtocol({ path: PATH })], ...opts })
  return { redis, ...app }
}

/** Uploads with an API key (`Authorization: Bearer`), so the key's owner owns the job. */
async function uploadWith (url: string, key: string, content: string, kind = 'batch'): Promise<string> {
  const up = await upload(`${url}/${kind}/upload`, content, { headers: { authorization: `Bearer ${key}` } })
  if (up.status !== 202) throw new Error(`upload failed: ${up.status} ${JSON.stringify(up.body)}`)
  return up.body.job_id
}

/** A client on the jobs socket that has seen `connected`. */
async function jobsClient (t: Teardown, ws: string, key: string): Promise<Client> {
  const client = connect(t, `${ws}${PATH}?api_key=${key}`)
  await client.waitFor(m => m.type === 'connected')
  return client
}

const updates = (client: Client, jobId: string): any[] => client.messages.filter(m => m.type === 'job_update' && m.job_id === jobId)

/** Proves the socket still answers: a ping gets a pong (each call waits for a new one). */
async function stillOpen (client: Client): Promise<void> {
  const seen = client.messages.filter(m => m.type === 'pong').length
  client.send({ action: 'ping' })
  await client.waitFor(() => client.messages.filter(m => m.type === 'pong').length > seen)
}

t.test('connected, subscribed then the current state, running with progress, succeeded with its result', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const up = await upload(`${url}/batch/upload`, lines(4), { headers: { authorization: 'Bearer key-alice' } })
  t.equal(up.status, 202)
  t.equal(up.cookie, undefined, 'an upload made with a key starts no session')
  const jobId = up.body.job_id

  const client = await jobsClient(t, ws, 'key-alice')
  t.match(client.messages[0], { type: 'connected', message: 'WebSocket connection established' }, 'the first message is connected')
  client.send({ action: 'subscribe', job_id: jobId })
  const subscribed = await client.waitFor(m => m.type === 'subscribed')
  t.same(Object.keys(subscribed).sort(), ['job_id', 'ts', 'type'])
  t.equal(subscribed.job_id, jobId)
  await client.waitFor(m => m.type === 'job_update')
  const i = client.messages.indexOf(subscribed)
  t.match(client.messages[i + 1], { type: 'job_update', job_id: jobId, status: 'queued', result: null, error: null, processed: 0 }, 'subscribed is immediately followed by the current status')

  startWorker(t, redis, 'batch', uploadDir, { delayMs: 20 })
  const final = await client.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  t.same(final, { type: 'job_update', job_id: jobId, status: 'succeeded', result: { lines: 4 }, error: null, progress: 100, processed: 4, total: 4, eta_seconds: 0, ts: final.ts, version: final.version })
  t.match(final.version, /^1\.\d+-\d+$/, 'the hub fills the continuity version: attempt and stream entry id')
  const running = updates(client, jobId).filter(m => m.status === 'running')
  t.ok(running.length > 0, 'running updates came between queued and succeeded')
  t.ok(running.every(m => m.result === null && m.error === null && [0, 4].includes(m.total)), 'running updates carry no result or error; total is 0 until the worker reports it')
  const processed = updates(client, jobId).map(m => m.processed)
  t.same(processed, [...processed].sort((a, b) => a - b), 'processed never goes back')
  const statuses = [...new Set(updates(client, jobId).map(m => m.status))]
  t.same(statuses, ['queued', 'running', 'succeeded'])
  t.ok(client.messages.every(m => typeof m.type === 'string' && Number.isInteger(m.ts) && Math.abs(m.ts - Date.now() / 1000) < 60), 'every message has a type and an integer Unix ts')

  await stillOpen(client)
  t.match(client.messages.at(-1), { type: 'pong' }, 'the socket stays open after the job ends; ping gets pong')
})

t.test('failed carries the error, cancelled says so; one socket watches both', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const failing = await uploadWith(url, 'key-alice', lines(3, 2))
  const idle = await uploadWith(url, 'key-alice', lines(3), 'dataset')
  const client = await jobsClient(t, ws, 'key-alice')
  client.send({ action: 'subscribe', job_id: failing })
  client.send({ action: 'subscribe', job_id: idle })
  await client.waitFor(m => m.type === 'job_update' && m.job_id === idle)

  startWorker(t, redis, 'batch', uploadDir)
  const failed = await client.waitFor(m => m.type === 'job_update' && m.status === 'failed')
  t.match(failed, { job_id: failing, result: null, error: 'record on line 2 is FAIL' })

  const res = await fetch(`${url}/dataset/${idle}/cancel`, { method: 'POST', headers: { authorization: 'Bearer key-alice' } })
  t.equal(res.status, 202)
  const cancelled = await client.waitFor(m => m.type === 'job_update' && m.status === 'cancelled')
  t.match(cancelled, { job_id: idle, result: null, error: 'cancelled' })
})

t.test('a job that waits in the queue stays queued across reconciles, then runs to the end', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t, { reconcileIntervalMs: 100 })
  const jobId = await uploadWith(url, 'key-alice', lines(2))
  const client = await jobsClient(t, ws, 'key-alice')
  client.send({ action: 'subscribe', job_id: jobId })
  await client.waitFor(m => m.type === 'job_update')
  // Several reconciles re-read the waiting job; none may take it for a removed one.
  await sleep(500)
  t.same(updates(client, jobId).map(m => m.status), ['queued'], 'still queued, nothing else')
  startWorker(t, redis, 'batch', uploadDir)
  t.match(await client.waitFor(m => m.type === 'job_update' && m.status !== 'queued' && m.status !== 'running'), { status: 'succeeded', result: { lines: 2 } })
})

t.test('bad client messages get an error and the connection stays open', async (t) => {
  const { ws } = await setup(t)
  const client = await jobsClient(t, ws, 'key-alice')
  const cases: Array<[string | Buffer, RegExp]> = [
    ['not json', /^Invalid JSON/],
    ['[1,2]', /^Messages must be JSON objects/],
    [JSON.stringify({ action: 'subscribe' }), /^Missing job_id for subscribe$/],
    [JSON.stringify({ action: 'unsubscribe', job_id: '' }), /^Missing job_id for unsubscribe$/],
    [JSON.stringify({ action: 'explode' }), /^Unknown action: explode \(expected subscribe, unsubscribe, subscribe_mine, unsubscribe_mine or ping\)$/],
    [JSON.stringify({ job_id: 'x' }), /^Unknown action: null/],
    [JSON.stringify({ action: 'subscribe', job_id: '550e8400-e29b-41d4-a716-446655440000' }), /^Job not found or access denied: 550e8400-e29b-41d4-a716-446655440000$/],
    [JSON.stringify({ action: 'subscribe', job_id: '../../etc/passwd' }), /^Job not found or access denied: \.\.\/\.\.\/etc\/passwd$/],
    [Buffer.from([1, 2, 3]), /^Binary frames are not supported/]
  ]
  for (const [frame, expected] of cases) {
    const before = client.messages.length
    client.socket.send(frame)
    const error = await client.waitFor(m => client.messages.indexOf(m) >= before && m.type === 'error')
    t.match(error.message, expected, `${String(frame).slice(0, 40)} → ${error.message}`)
    t.ok(Number.isInteger(error.ts))
  }
  await stillOpen(client)
  t.equal(client.socket.readyState, 1, 'still open after every error')
})

t.test('heartbeat every heartbeatIntervalMs; pong on ping', async (t) => {
  const { ws } = await setup(t, { heartbeatIntervalMs: 150 })
  const client = await jobsClient(t, ws, 'key-alice')
  const first = await client.waitFor(m => m.type === 'heartbeat')
  const second = await client.waitFor(m => m.type === 'heartbeat' && m !== first)
  t.same(Object.keys(second).sort(), ['ts', 'type'])
  client.send({ action: 'ping' })
  t.same(Object.keys(await client.waitFor(m => m.type === 'pong')).sort(), ['ts', 'type'])
})

t.test('API key by query, by Sec-WebSocket-Protocol (echoed back), or the session cookie; missing or wrong: 4001', async (t) => {
  const { url, ws } = await setup(t)

  const none = connect(t, `${ws}${PATH}`)
  const refused = await none.closed
  t.same(refused, { code: 4001, reason: 'authentication required: no session or API key' })
  t.match(none.messages, [{ type: 'error', message: 'authentication required: no session or API key' }], 'an error event precedes the close')
  t.notOk(none.messages.some(m => m.type === 'connected'))

  const wrong = connect(t, `${ws}${PATH}?api_key=nope`)
  t.same(await wrong.closed, { code: 4001, reason: 'invalid API key' })
  const wrongProtocol = connect(t, `${ws}${PATH}`, { protocols: 'nope' })
  t.same(await wrongProtocol.closed, { code: 4001, reason: 'invalid API key' })

  // A browser cannot set headers: it offers the key as the subprotocol, and its handshake fails
  // unless the server selects that protocol in the answer (`ws` checks this as browsers do).
  const byProtocol = connect(t, `${ws}${PATH}`, { protocols: 'key-alice' })
  await byProtocol.waitFor(m => m.type === 'connected')
  t.equal(byProtocol.socket.protocol, 'key-alice', 'the server echoes the offered protocol')

  const up = await upload(`${url}/batch/upload`, lines(2))
  t.match(up.cookie, /^jp_session=/)
  const byCookie = connect(t, `${ws}${PATH}`, { cookie: up.cookie })
  await byCookie.waitFor(m => m.type === 'connected')
  byCookie.send({ action: 'subscribe', job_id: up.body.job_id })
  t.match(await byCookie.waitFor(m => m.type === 'job_update'), { job_id: up.body.job_id, status: 'queued' }, 'a session subscribes to its own job')

  const forged = connect(t, `${ws}${PATH}`, { cookie: 'jp_session=forged.value' })
  t.equal((await forged.closed).code, 4001, 'an unsigned cookie is no session')

  // A browser app that offers a subprotocol of its own is not refused as a wrong key when its
  // session cookie vouches for it.
  const appProtocol = connect(t, `${ws}${PATH}`, { protocols: 'chat.v1', cookie: up.cookie })
  await appProtocol.waitFor(m => m.type === 'connected')
  appProtocol.send({ action: 'subscribe', job_id: up.body.job_id })
  t.match(await appProtocol.waitFor(m => m.type === 'job_update'), { job_id: up.body.job_id }, 'the session owns its job through a subprotocol-offering socket')
})

t.test('a job uploaded with key A: key A subscribes, key B and other sessions get "not found"; HTTP routes too', async (t) => {
  const { url, ws } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(2))

  const alice = await jobsClient(t, ws, 'key-alice')
  alice.send({ action: 'subscribe', job_id: jobId })
  t.match(await alice.waitFor(m => m.type === 'job_update'), { job_id: jobId, status: 'queued' })

  const bob = await jobsClient(t, ws, 'key-bob')
  bob.send({ action: 'subscribe', job_id: jobId })
  t.same((await bob.waitFor(m => m.type === 'error')).message, `Job not found or access denied: ${jobId}`)
  t.notOk(bob.messages.some(m => m.type === 'subscribed' || m.type === 'job_update'), 'nothing about the job reaches key B')
  await stillOpen(bob)

  const stranger = await upload(`${url}/batch/upload`, lines(1))
  const session = connect(t, `${ws}${PATH}`, { cookie: stranger.cookie })
  await session.waitFor(m => m.type === 'connected')
  session.send({ action: 'subscribe', job_id: jobId })
  t.same((await session.waitFor(m => m.type === 'error')).message, `Job not found or access denied: ${jobId}`)

  const status = async (headers: Record<string, string>): Promise<number> => (await fetch(`${url}/batch/${jobId}/status`, { headers })).status
  t.equal(await status({ authorization: 'Bearer key-alice' }), 200, 'Bearer key A reads the status')
  t.equal(await status({ authorization: 'Bearer key-bob' }), 404, 'key B: not found')
  t.equal(await status({ authorization: 'Bearer nope' }), 401, 'a wrong key: 401')
  t.equal(await status({}), 401, 'no credentials: 401')
})

t.test('unsubscribe stops a job\'s updates; a repeated subscribe answers with the current state again', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const first = await uploadWith(url, 'key-alice', lines(3))
  const second = await uploadWith(url, 'key-alice', lines(3))
  const client = await jobsClient(t, ws, 'key-alice')
  client.send({ action: 'subscribe', job_id: first })
  client.send({ action: 'subscribe', job_id: second })
  await client.waitFor(m => m.type === 'job_update' && m.job_id === second)

  client.send({ action: 'subscribe', job_id: second })
  await client.waitFor(() => client.messages.filter(m => m.type === 'subscribed' && m.job_id === second).length === 2)
  await client.waitFor(() => updates(client, second).length === 2)
  const again = client.messages.findLastIndex(m => m.type === 'subscribed')
  t.match(client.messages[again + 1], { type: 'job_update', job_id: second, status: 'queued' }, 'subscribed again, then the current state again')

  client.send({ action: 'unsubscribe', job_id: first })
  const unsubscribed = await client.waitFor(m => m.type === 'unsubscribed')
  t.same(Object.keys(unsubscribed).sort(), ['job_id', 'ts', 'type'])
  t.equal(unsubscribed.job_id, first)
  const cut = client.messages.indexOf(unsubscribed)

  // One worker, one job at a time, in upload order: `first` ends before `second` starts.
  startWorker(t, redis, 'batch', uploadDir)
  await client.waitFor(m => m.type === 'job_update' && m.job_id === second && m.status === 'succeeded')
  t.notOk(client.messages.slice(cut + 1).some(m => m.job_id === first), 'nothing about the unsubscribed job after unsubscribed')
})

t.test('limits: subscriptions per connection (error, stays open), connections per owner (1008), max payload (1009)', async (t) => {
  const { url, ws, app } = await setup(t, { maxSubscriptionsPerConnection: 2, maxConnectionsPerOwner: 2 })
  const jobs = [await uploadWith(url, 'key-alice', lines(1)), await uploadWith(url, 'key-alice', lines(1)), await uploadWith(url, 'key-alice', lines(1))]

  const client = await jobsClient(t, ws, 'key-alice')
  client.send({ action: 'subscribe', job_id: jobs[0] })
  client.send({ action: 'subscribe', job_id: jobs[1] })
  client.send({ action: 'subscribe', job_id: jobs[2] })
  const limit = await client.waitFor(m => m.type === 'error')
  t.equal(limit.message, 'Subscription limit reached: at most 2 jobs per connection')
  t.match(limit, { job_id: jobs[2] }, 'the error names the job it refused')
  t.notOk(client.messages.some(m => m.type !== 'error' && m.job_id === jobs[2]), 'the third job was not subscribed')
  client.send({ action: 'unsubscribe', job_id: jobs[0] })
  client.send({ action: 'subscribe', job_id: jobs[2] })
  t.match(await client.waitFor(m => m.type === 'job_update' && m.job_id === jobs[2]), { status: 'queued' }, 'after an unsubscribe there is room again')

  const second = await jobsClient(t, ws, 'key-alice')
  const third = connect(t, `${ws}${PATH}?api_key=key-alice`)
  t.same(await third.closed, { code: 1008, reason: 'too many connections (2 per owner)' })
  await jobsClient(t, ws, 'key-bob')
  t.pass('another owner still connects')
  second.close()
  // The server counts the connection gone once it sees the close.
  for (let i = 0; i < 200 && app.jobProgress.stats().sockets > 2; i++) await sleep(10)
  await jobsClient(t, ws, 'key-alice')
  t.pass('a closed connection frees its place')

  const big = await jobsClient(t, ws, 'key-bob')
  big.send(JSON.stringify({ action: 'subscribe', job_id: 'x'.repeat(5000) }))
  t.equal((await big.closed).code, 1009, 'a frame over maxPayload (4096 bytes) closes with 1009')
  await stillOpen(client)
})

t.test('a protocol without an error renderer closes with 1008 and the reason instead of failing silently', async (t) => {
  const bare = defineProtocol({
    name: 'bare',
    path: '/bare',
    parse: (text) => text.startsWith('sub ') ? { type: 'subscribe', jobId: text.slice(4) } : { type: 'invalid', message: `Unknown command: ${text}` },
    render: (event) => ({ id: event.jobId, state: event.state })
  })
  const { url, ws } = await setup(t, { protocols: [bare] })
  const jobId = await uploadWith(url, 'key-alice', lines(1))
  const ok = connect(t, `${ws}/bare?api_key=key-alice`)
  await ok.opened
  ok.send(`sub ${jobId}`)
  t.same(await ok.waitFor(() => true), { id: jobId, state: 'queued' })

  const foreign = connect(t, `${ws}/bare?api_key=key-bob`)
  await foreign.opened
  foreign.send(`sub ${jobId}`)
  t.same(await foreign.closed, { code: 1008, reason: `Job not found or access denied: ${jobId}` })
  t.same(foreign.messages, [])

  // The reason quotes the client's text: it is cut to the 123 bytes a close frame allows.
  const odd = connect(t, `${ws}/bare?api_key=key-bob`)
  await odd.opened
  odd.send('ü'.repeat(200))
  const closed = await odd.closed
  t.equal(closed.code, 1008)
  t.match(closed.reason, /^Unknown command: ü+$/)
  t.ok(Buffer.byteLength(closed.reason) <= 123)
})
