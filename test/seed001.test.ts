import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { scanProtocol } from '../example/protocols'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

// Seed 001's dialect, added as a protocol of the user's own (example/protocols.ts) at `/ws`, next
// to the built-in per-job routes under the same prefix.

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown) {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice' }, protocols: [scanProtocol({ path: '/ws' })] })
  return { redis, ...app }
}

t.test('subscribe → subscribed → status_update calculating … optimal → close 1000', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const up = await upload(`${url}/batch/upload`, lines(4))
  const runUuid = up.body.job_id
  const client = connect(t, `${ws}/ws`, { cookie: up.cookie })
  await client.opened
  client.send({ type: 'subscribe', run_uuid: runUuid })
  const subscribed = await client.waitFor(m => m.type === 'subscribed')
  t.same(subscribed, { type: 'subscribed', run_uuid: runUuid, data: { message: 'Subscribed to scan updates' } })
  await client.waitFor(m => m.type === 'status_update')
  t.same(client.messages[1], {
    type: 'status_update',
    run_uuid: runUuid,
    data: { progression: 0, currentProgress: 0, status: 'calculating', processed: 0, total: 0, eta_seconds: null }
  }, 'the current state follows subscribed at once')

  startWorker(t, redis, 'batch', uploadDir, { delayMs: 20 })
  const final = await client.waitFor(m => m.type === 'status_update' && m.data.status !== 'calculating')
  t.same(final, {
    type: 'status_update',
    run_uuid: runUuid,
    data: { progression: 100, currentProgress: 100, status: 'optimal', processed: 4, total: 4, eta_seconds: 0, result_url: `/batch/${runUuid}/result` }
  })
  t.same(await client.closed, { code: 1000, reason: 'job finished' }, 'the server closes with 1000 after the final update')
  const updates = client.messages.filter(m => m.type === 'status_update')
  t.ok(updates.every(m => m.run_uuid === runUuid && m.data.progression === m.data.currentProgress), 'progression and currentProgress agree')
  const progression = updates.map(m => m.data.progression)
  t.same(progression, [...progression].sort((a, b) => a - b), 'progression never goes back')
  t.ok(updates.slice(0, -1).every(m => m.data.status === 'calculating'), 'calculating until the end')

  const res = await fetch(`${url}${final.data.result_url}`, { headers: { cookie: up.cookie as string } })
  t.same(await res.json(), { job_id: runUuid, result: { lines: 4 } }, 'result_url answers the result')
})

t.test('several runs on one socket; unsubscribe; the socket closes once every run has ended; failed says so', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const first = await upload(`${url}/batch/upload`, lines(2))
  const cookie = first.cookie
  const failing = await upload(`${url}/batch/upload`, lines(3, 2), { cookie })
  const dropped = await upload(`${url}/dataset/upload`, lines(2), { cookie })
  const client = connect(t, `${ws}/ws`, { cookie })
  await client.opened
  for (const run of [first, failing, dropped]) client.send({ type: 'subscribe', run_uuid: run.body.job_id })
  await client.waitFor(m => m.type === 'status_update' && m.run_uuid === dropped.body.job_id)
  client.send({ type: 'unsubscribe', run_uuid: dropped.body.job_id })
  t.same(await client.waitFor(m => m.type === 'unsubscribed'), { type: 'unsubscribed', run_uuid: dropped.body.job_id, data: { message: 'Unsubscribed from scan updates' } })

  // One worker, upload order: `first` ends while `failing` is still to come, so the socket stays.
  startWorker(t, redis, 'batch', uploadDir)
  await client.waitFor(m => m.run_uuid === first.body.job_id && m.data.status === 'optimal')
  const failed = await client.waitFor(m => m.run_uuid === failing.body.job_id && m.data.status === 'failed')
  t.match(failed.data, { status: 'failed', error: 'record on line 2 is FAIL', processed: 1, total: 3 })
  t.notOk('result_url' in failed.data)
  t.equal((await client.closed).code, 1000, 'closed once both subscribed runs ended; the unsubscribed one does not hold it open')
})

t.test('a run that ended before the subscribe: final update at once, then 1000', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const up = await upload(`${url}/batch/upload`, lines(1))
  const worker = startWorker(t, redis, 'batch', uploadDir)
  await new Promise(resolve => worker.once('completed', resolve))
  const client = connect(t, `${ws}/ws`, { cookie: up.cookie })
  await client.opened
  client.send({ type: 'subscribe', run_uuid: up.body.job_id })
  t.equal((await client.closed).code, 1000)
  t.same(client.messages.map(m => m.type), ['subscribed', 'status_update'])
  t.equal(client.messages[1].data.status, 'optimal')
})

t.test('bad messages and foreign runs get an error with run_uuid; the socket stays; no credentials: 4001', async (t) => {
  const { url, ws } = await setup(t)
  const mine = await upload(`${url}/batch/upload`, lines(1))
  const theirs = await upload(`${url}/batch/upload`, lines(1))
  const client = connect(t, `${ws}/ws`, { cookie: mine.cookie })
  await client.opened
  client.send('nope')
  t.match((await client.waitFor(m => m.type === 'error')).data.message, /^Invalid JSON/)
  client.send({ type: 'subscribe' })
  await client.waitFor(m => m.data?.message === 'Missing run_uuid for subscribe')
  client.send({ type: 'listen', run_uuid: 'x' })
  await client.waitFor(m => typeof m.data?.message === 'string' && m.data.message.startsWith('Unknown message type: listen'))
  client.send({ type: 'subscribe', run_uuid: theirs.body.job_id })
  const denied = await client.waitFor(m => m.type === 'error' && m.run_uuid === theirs.body.job_id)
  t.same(denied.data, { message: `Job not found or access denied: ${theirs.body.job_id}` })
  client.send({ type: 'subscribe', run_uuid: mine.body.job_id })
  await client.waitFor(m => m.type === 'status_update')
  t.notOk(client.messages.some(m => m.type === 'status_update' && m.run_uuid === theirs.body.job_id), 'nothing about a foreign run')
  await sleep(50)
  t.equal(client.socket.readyState, 1, 'still open')

  const anonymous = connect(t, `${ws}/ws`)
  t.equal((await anonymous.closed).code, 4001)
  const byKey = connect(t, `${ws}/ws?api_key=key-alice`)
  await byKey.opened
  byKey.send({ type: 'subscribe', run_uuid: mine.body.job_id })
  t.match(await byKey.waitFor(m => m.type === 'error'), { run_uuid: mine.body.job_id }, 'an API key works too, and owns its own jobs only')
})

t.test('the per-job routes under the same prefix still work beside it', async (t) => {
  const { url, ws } = await setup(t)
  const up = await upload(`${url}/batch/upload`, lines(1))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  t.match(await client.waitFor(() => true), { job_id: up.body.job_id, status: 'processing' })
  t.equal(up.body.ws_url, `${ws}/ws/batch/${up.body.job_id}`)
})

t.test('a finished run and a running one subscribed in one write: the socket stays until both ended', async (t) => {
  const { url, ws, redis, uploadDir } = await setup(t)
  const done = await upload(`${url}/batch/upload`, lines(1))
  const cookie = done.cookie
  const worker = startWorker(t, redis, 'batch', uploadDir)
  await new Promise(resolve => worker.once('completed', resolve))
  await worker.close()
  const running = await upload(`${url}/batch/upload`, lines(3), { cookie })

  const client = connect(t, `${ws}/ws`, { cookie })
  await client.opened
  // Both frames in one TCP write: the server parses them in one go.
  const tcp = (client.socket as unknown as { _socket: { cork: () => void, uncork: () => void } })._socket
  tcp.cork()
  client.send({ type: 'subscribe', run_uuid: done.body.job_id })
  client.send({ type: 'subscribe', run_uuid: running.body.job_id })
  tcp.uncork()
  await client.waitFor(m => m.type === 'status_update' && m.run_uuid === done.body.job_id && m.data.status === 'optimal')
  await client.waitFor(m => m.type === 'status_update' && m.run_uuid === running.body.job_id)
  client.send({ type: 'bogus' })
  await client.waitFor(m => m.type === 'error')
  t.equal(client.socket.readyState, 1, 'still open: the running job has not ended')

  startWorker(t, redis, 'batch', uploadDir)
  await client.waitFor(m => m.run_uuid === running.body.job_id && m.data.status === 'optimal')
  t.same(await client.closed, { code: 1000, reason: 'job finished' })
})
