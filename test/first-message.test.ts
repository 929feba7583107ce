import t from 'tap'
import { tokenSocketProtocol } from '../example/protocols'
import { jobsProtocol } from '../lib/index'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

// Authentication by the first message (seed 003): `{ "token": "<API key>" }` is the first frame;
// nothing about any job is answered before it is checked.

const KEYS = { 'key-alice': 'alice', 'key-bob': 'bob' }
const PATH = '/api/v1/socket'

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown, firstMessageTimeoutMs = 5_000) {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, {
    apiKeys: KEYS,
    firstMessageTimeoutMs,
    protocols: [tokenSocketProtocol({ path: PATH }), jobsProtocol({ path: '/first/jobs', auth: 'first-message' })]
  })
  return { redis, ...app }
}

const uploadWith = async (url: string, key: string, content: string): Promise<string> =>
  (await upload(`${url}/batch/upload`, content, { headers: { authorization: `Bearer ${key}` } })).body.job_id

t.test('token → initialised; subscribe → subscribed, then progress in the progress socket\'s shape, to complete', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(3))
  const client = connect(t, `${ws}${PATH}`)
  await client.opened
  client.send({ token: 'key-alice' })
  t.same(await client.waitFor(() => true), { state: 'initialised', data: {} })
  client.send({ state: 'subscribe', data: { job_id: jobId } })
  t.same(await client.waitFor(m => m.state === 'subscribed'), { state: 'subscribed', data: { job_id: jobId } })
  await client.waitFor(m => m.state === 'progress')
  t.same(client.messages[2], { state: 'progress', data: { job_id: jobId, status: 'processing', progress: 0, processed: 0, total: 0, eta_seconds: null } })

  startWorker(t, redis, 'batch', uploadDir, { delayMs: 10 })
  const done = await client.waitFor(m => m.state === 'progress' && m.data.status === 'complete')
  t.same(done.data, { job_id: jobId, status: 'complete', progress: 100, processed: 3, total: 3, eta_seconds: 0 })
  client.send({ state: 'ping' })
  t.same(await client.waitFor(m => m.state === 'pong'), { state: 'pong', data: {} }, 'the session stays open after the job ends')
  client.send({ state: 'unsubscribe', data: { job_id: jobId } })
  t.same(await client.waitFor(m => m.state === 'unsubscribed'), { state: 'unsubscribed', data: { job_id: jobId } })
})

t.test('messages sent right behind the token are kept and answered once it is checked', async (t) => {
  const { url, ws } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(1))
  const client = connect(t, `${ws}${PATH}`)
  await client.opened
  client.send({ token: 'key-alice' })
  client.send({ state: 'subscribe', data: { job_id: jobId } })
  await client.waitFor(m => m.state === 'progress')
  t.same(client.messages.map(m => m.state), ['initialised', 'subscribed', 'progress'])
})

t.test('a wrong or missing token: error "Could not validate credentials." then close 4001', async (t) => {
  const { url, ws } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(1))
  for (const first of [{ token: 'nope' }, { token: 42 }, { state: 'subscribe', data: { job_id: jobId } }, 'not json', { token: '' }]) {
    const client = connect(t, `${ws}${PATH}`)
    await client.opened
    client.send(first)
    client.send({ state: 'subscribe', data: { job_id: jobId } })
    t.same(await client.closed, { code: 4001, reason: 'Could not validate credentials.' }, JSON.stringify(first))
    t.same(client.messages, [{ state: 'error', error: 'Could not validate credentials.' }], 'the error, and nothing about the job')
  }
})

t.test('a client that sends nothing within firstMessageTimeoutMs is closed with 4001', async (t) => {
  const { ws } = await setup(t, 300)
  const client = connect(t, `${ws}${PATH}`)
  await client.opened
  const started = Date.now()
  const closed = await client.closed
  t.equal(closed.code, 4001)
  t.match(closed.reason, /^authentication timeout/)
  t.match(client.messages, [{ state: 'error', error: /^authentication timeout: send \{"token": "\.\.\."\} first/ }])
  t.ok(Date.now() - started >= 200, 'not before the timeout')
})

t.test('the token\'s owner owns the jobs: another key\'s job is "not found"; credentials on the request are not used', async (t) => {
  const { url, ws } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(1))
  const bob = connect(t, `${ws}${PATH}?api_key=key-alice`)
  await bob.opened
  bob.send({ token: 'key-bob' })
  await bob.waitFor(m => m.state === 'initialised')
  bob.send({ state: 'subscribe', data: { job_id: jobId } })
  t.same(await bob.waitFor(m => m.state === 'error'), { state: 'error', error: `Job not found or access denied: ${jobId}`, data: { job_id: jobId } })
  bob.send({ state: 'start' })
  t.match(await bob.waitFor(m => m.state === 'error' && m.error.startsWith('Unknown state')), { error: /^Unknown state: start/ })
  bob.send({ state: 'ping' })
  await bob.waitFor(m => m.state === 'pong')
  t.equal(bob.socket.readyState, 1, 'errors leave the session open')
})

t.test('the jobs protocol with auth: first-message', async (t) => {
  const { url, ws } = await setup(t)
  const jobId = await uploadWith(url, 'key-alice', lines(1))
  const client = connect(t, `${ws}/first/jobs`)
  await client.opened
  client.send({ token: 'key-alice' })
  await client.waitFor(m => m.type === 'connected')
  client.send({ action: 'subscribe', job_id: jobId })
  t.match(await client.waitFor(m => m.type === 'job_update'), { job_id: jobId, status: 'queued' })

  const bad = connect(t, `${ws}/first/jobs`)
  await bad.opened
  bad.send({ token: 'nope' })
  t.equal((await bad.closed).code, 4001)
  t.match(bad.messages, [{ type: 'error', message: 'Could not validate credentials.' }])
})
