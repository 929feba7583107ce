import t, { type Test } from 'tap'
import { Queue } from 'bullmq'
import type { LookupAddress } from 'node:dns'
import { errors, type JobProgressOptions } from '../lib/index'
import { parseVersion } from '../lib/wire/version'
import { eventually, gate, jobKeys, lines, redisFor, startApp, startWorker, tempDir, upload, type RedisServer } from './helpers/index'
import { newSecret, Receiver, selfSigned } from './helpers/receiver'

const SECRET = newSecret()
const OLD_SECRET = newSecret()
/** Short tries for tests: 300 ms, then 600, 1200 ... without jitter. */
const FAST = { secret: [SECRET, OLD_SECRET], backoffMs: 300, jitter: 0, attempts: 4, timeoutMs: 2_000, connectTimeoutMs: 1_000 }

type Opts = Partial<JobProgressOptions>

async function setup (t: Test, webhook: NonNullable<JobProgressOptions['kinds'][string]['webhook']>, webhooks: NonNullable<JobProgressOptions['webhooks']> = {}, extra: Opts = {}) {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const api = await startApp(t, redis, { uploadDir, kinds: { batch: { webhook } }, webhooks: { ...FAST, ...webhooks }, ...extra })
  const deliveries = deliveryQueue(t, redis)
  return { redis, uploadDir, api, deliveries }
}

function deliveryQueue (t: Test, redis: RedisServer): Queue {
  const queue = new Queue('jp-webhooks', { connection: { host: '127.0.0.1', port: redis.port } })
  t.teardown(async () => await queue.close())
  return queue
}

async function stateOf (queue: Queue, state: 'completed' | 'failed', n = 1, timeoutMs = 20_000): Promise<void> {
  const ok = await eventually(async () => (await queue.getJobCounts(state))[state] >= n, timeoutMs, 50)
  if (!ok) throw new Error(`no ${n} ${state} deliveries within ${timeoutMs} ms: ${JSON.stringify(await queue.getJobCounts())}`)
}

t.test('a receiver that fails 3 times then answers 200: 4 signed tries, spaced per the backoff, one delivery', async (t) => {
  const receiver = await Receiver.start(t, [SECRET, OLD_SECRET])
  receiver.answer = (call) => call.n <= 3 ? { status: 500, body: 'not now' } : { status: 200 }
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url + '/hook' })
  const up = await upload(`${api.url}/batch/upload`, lines(3))
  t.equal(up.status, 202)
  startWorker(t, redis, 'batch', uploadDir)
  const calls = await receiver.waitCalls(4)
  await stateOf(deliveries, 'completed')
  t.equal(calls.length, 4, 'exactly 4 tries')
  t.ok(calls.every(c => c.verified.every(Boolean)), 'every try verifies with each active secret (rotation)')
  t.equal(new Set(calls.map(c => c.headers['webhook-id'])).size, 1, 'the same webhook-id on every try')
  t.equal(calls[0].headers['webhook-signature']?.split(' ').length, 2, 'one signature per secret, space-separated')
  t.ok(Number(calls[3].headers['webhook-timestamp']) > Number(calls[0].headers['webhook-timestamp']), 'each try signed anew, with its own timestamp')
  const gaps = calls.slice(1).map((c, i) => c.at - calls[i].at)
  t.ok(gaps[0] >= 280 && gaps[1] >= 580 && gaps[2] >= 1180, `spaced per the backoff (300, 600, 1200 ms): ${gaps.join(', ')}`)
  t.ok(gaps[2] < 4000, 'and not much more')
  const body = JSON.parse(calls[3].body)
  t.same(body, { type: 'job_update', job_id: up.body.job_id, status: 'succeeded', result: { lines: 3 }, error: null, progress: 100, processed: 3, total: 3, eta_seconds: 0, ts: body.ts, version: body.version })
  // The version is the final's: its attempt and the entry id of its `completed` in the event stream.
  const probe = redis.client()
  const entries = await probe.xrange(api.app.jobProgress.keys.queueKey('batch', 'events'), '-', '+')
  probe.disconnect()
  const completed = entries.find(([, f]) => f[f.indexOf('event') + 1] === 'completed' && f[f.indexOf('jobId') + 1] === up.body.job_id)
  t.ok(parseVersion(body.version) !== null, `the version parses: ${String(body.version)}`)
  t.equal(body.version, `1.${completed?.[0] ?? '?'}`, 'and is the final\'s: attempt 1, its entry id')
  t.ok(Math.abs(body.ts - Date.now() / 1000) < 30, 'ts is Unix seconds, as in the jobs protocol')
  t.equal(calls[3].path, '/hook')
})

t.test('a failed job is delivered as failed with its error; status and progress events when asked', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url, events: ['final', 'status', 'progress'], progressIntervalSeconds: 60 })
  const up = await upload(`${api.url}/batch/upload`, lines(4, 3))
  startWorker(t, redis, 'batch', uploadDir)
  await eventually(() => receiver.calls.some(c => JSON.parse(c.body).status === 'failed'), 15_000)
  await stateOf(deliveries, 'completed', receiver.calls.length)
  const bodies = receiver.calls.map(c => JSON.parse(c.body))
  const failed = bodies.find(b => b.status === 'failed')
  t.equal(failed.error, 'record on line 3 is FAIL')
  t.equal(failed.job_id, up.body.job_id)
  t.ok(bodies.some(b => b.status === 'queued'), 'queued (status)')
  t.ok(bodies.some(b => b.status === 'running' && b.processed === 0), 'running (status)')
  t.equal(bodies.filter(b => b.status === 'running' && b.processed > 0).length, 1, 'progress at most once per interval')
  t.equal(new Set(receiver.calls.map(c => c.headers['webhook-id'])).size, receiver.calls.length, 'each event its own delivery id')
  t.ok(bodies.every(b => parseVersion(b.version)?.attempt === 1), `every payload carries a version: ${bodies.map(b => String(b.version)).join(', ')}`)
})

t.test('a job cancelled while it runs is delivered as cancelled, as the jobs protocol says', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url })
  const up = await upload(`${api.url}/batch/upload`, lines(3))
  const started = gate()
  const go = gate()
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 1) { started.open(); await go.promise } } })
  await started.promise
  const cancel = await fetch(`${api.url}/batch/${up.body.job_id as string}/cancel`, { method: 'POST', headers: { cookie: up.cookie as string } })
  t.equal(cancel.status, 202)
  go.open()
  const [call] = await receiver.waitCalls(1)
  await stateOf(deliveries, 'completed')
  t.match(JSON.parse(call.body), { job_id: up.body.job_id, status: 'cancelled', error: 'cancelled', result: null })
})

t.test('a receiver that hangs is timed out and tried again', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  receiver.answer = (call) => call.n === 1 ? 'hang' : { status: 204 }
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url }, { timeoutMs: 500 })
  await upload(`${api.url}/batch/upload`, lines(1))
  startWorker(t, redis, 'batch', uploadDir)
  const calls = await receiver.waitCalls(2)
  await stateOf(deliveries, 'completed')
  t.ok(calls[1].at - calls[0].at >= 500 + 280, 'the hanging try ended after timeoutMs, then the backoff')
  t.equal(calls[0].headers['webhook-id'], calls[1].headers['webhook-id'])
})

t.test('a redirect is not followed; 410 stops the tries; both end as dead deliveries', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  receiver.answer = (call) => call.path === '/moved' ? { status: 302, headers: { location: '/elsewhere' } } : call.path === '/gone' ? { status: 410, body: 'unsubscribed' } : { status: 200 }
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url + '/moved' }, { attempts: 2 })
  // A second kind on the same queue set-up: its endpoint answers 410.
  await upload(`${api.url}/batch/upload`, lines(1))
  startWorker(t, redis, 'batch', uploadDir)
  await stateOf(deliveries, 'failed')
  t.same(receiver.calls.map(c => c.path), ['/moved', '/moved'], 'two tries, the redirect target never called')
  const [dead] = await deliveries.getFailed()
  t.match(dead.failedReason, /HTTP 302 \(redirects are not followed\)/)

  const gone = await setup(t, { url: receiver.url + '/gone' }, { attempts: 5 })
  const before = receiver.calls.length
  await upload(`${gone.api.url}/batch/upload`, lines(1))
  startWorker(t, gone.redis, 'batch', gone.uploadDir)
  await stateOf(gone.deliveries, 'failed')
  t.equal(receiver.calls.length - before, 1, '410: one try, no more')
  const [goneJob] = await gone.deliveries.getFailed()
  t.match(goneJob.failedReason, /HTTP 410 Gone: unsubscribed/)
  t.equal(await goneJob.getState(), 'failed', 'nothing is scheduled after a 410')
})

t.test('an https endpoint whose certificate is not trusted is not delivered to', async (t) => {
  const receiver = await Receiver.start(t, [SECRET], await selfSigned(t))
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url }, { attempts: 1 })
  await upload(`${api.url}/batch/upload`, lines(1))
  startWorker(t, redis, 'batch', uploadDir)
  await stateOf(deliveries, 'failed')
  const [dead] = await deliveries.getFailed()
  t.match(dead.failedReason, /self[- ]signed certificate/)
  t.equal(receiver.calls.length, 0)
})

t.test('Retry-After: 5 makes the next try wait at least 5 s', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  receiver.answer = (call) => call.n === 1 ? { status: 503, headers: { 'retry-after': '5' } } : { status: 200 }
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url }, { backoffMs: 100 })
  await upload(`${api.url}/batch/upload`, lines(1))
  startWorker(t, redis, 'batch', uploadDir)
  const calls = await receiver.waitCalls(2, 15_000)
  await stateOf(deliveries, 'completed')
  t.ok(calls[1].at - calls[0].at >= 5000, `waited ${calls[1].at - calls[0].at} ms`)
})

t.test('per-upload endpoints: the allow-list, private addresses and metadata refused with a 400 at upload', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  const { api, redis, uploadDir } = await setup(t, { allow: ['*.example.com', 'localhost', '127.0.0.1', '169.254.169.254', '[::ffff:7f00:1]'], allowHttp: true })
  const cases: Array<[string, RegExp]> = [
    ['https://evil.test/hook', /evil\.test is not in the allowed hosts/],
    ['ftp://a.example.com/', /scheme must be https or http/],
    ['not a url', /not an absolute URL/],
    ['https://user:pw@a.example.com/', /credentials/],
    [`${receiver.url}/hook`, /resolves to 127\.0\.0\.1, a loopback, private, link-local or reserved address/],
    ['http://169.254.169.254/latest/meta-data/', /resolves to 169\.254\.169\.254/],
    ['http://[::ffff:127.0.0.1]/', /resolves to ::ffff:7f00:1/]
  ]
  for (const [url, reason] of cases) {
    const res = await upload(`${api.url}/batch/upload`, lines(1), { fields: { webhook_url: url } })
    t.equal(res.status, 400, url)
    t.equal(res.body.code, 'FST_JP_WEBHOOK_URL_REFUSED')
    t.match(res.body.message, reason)
  }
  t.same(await jobKeys(redis), [], 'no job was added for a refused upload')
  const { filesIn } = await import('./helpers/index')
  t.same(await filesIn(uploadDir), [], 'and no file kept')

  const other = await startApp(t, redis, { uploadDir, kinds: { plain: { webhook: { url: receiver.url } } }, webhooks: FAST })
  const res = await upload(`${other.url}/plain/upload`, lines(1), { fields: { webhook_url: 'https://a.example.com/' } })
  t.equal(res.status, 400)
  t.match(res.body.message, /do not take a per-upload webhook/)
})

t.test('a per-upload endpoint is delivered to the address its name was checked against', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  const fixed = await Receiver.start(t, [SECRET])
  const lookup = async (host: string): Promise<LookupAddress[]> => host === 'hooks.example.com' ? [{ address: '127.0.0.1', family: 4 }] : []
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: fixed.url, allow: ['*.example.com'], allowHttp: true }, { allowPrivateAddresses: true, lookup })
  const up = await upload(`${api.url}/batch/upload`, lines(2), { fields: { webhook_url: `http://hooks.example.com:${receiver.port}/mine` } })
  t.equal(up.status, 202)
  startWorker(t, redis, 'batch', uploadDir)
  const [call] = await receiver.waitCalls(1)
  await fixed.waitCalls(1)
  await stateOf(deliveries, 'completed', 2)
  t.equal(call.path, '/mine')
  t.equal(call.headers.host, `hooks.example.com:${receiver.port}`, 'the Host is the URL\'s name')
  t.equal(JSON.parse(call.body).status, 'succeeded')
  t.not(call.headers['webhook-id'], fixed.calls[0].headers['webhook-id'], 'each endpoint its own delivery id')
})

t.test('a name that resolves elsewhere at delivery is refused then, and lands in the dead letters', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  let address = '93.184.216.34'
  const lookup = async (): Promise<LookupAddress[]> => [{ address, family: 4 }]
  const { api, redis, uploadDir, deliveries } = await setup(t, { allow: ['hooks.example.com'], allowHttp: true }, { lookup })
  const up = await upload(`${api.url}/batch/upload`, lines(1), { fields: { webhook_url: `http://hooks.example.com:${receiver.port}/` } })
  t.equal(up.status, 202, 'a public address at upload')
  address = '127.0.0.1'
  startWorker(t, redis, 'batch', uploadDir)
  await stateOf(deliveries, 'failed')
  const [dead] = await deliveries.getFailed()
  t.match(dead.failedReason, /refused: hooks\.example\.com resolves to 127\.0\.0\.1/)
  t.equal(dead.attemptsMade, 1, 'no retries of a refused endpoint')
  t.equal(receiver.calls.length, 0)
})

t.test('dead letters: listed, replayed, delivered under the same id', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  let up = false
  receiver.answer = () => up ? { status: 200 } : { status: 500, body: 'x'.repeat(10_000) }
  const authorize = (request: { headers: Record<string, unknown> }): boolean => request.headers['x-admin'] === 'yes'
  const { api, redis, uploadDir, deliveries } = await setup(t, { url: receiver.url }, { attempts: 2, maxResponseBytes: 16, authorize })
  const job = await upload(`${api.url}/batch/upload`, lines(1))
  startWorker(t, redis, 'batch', uploadDir)
  await stateOf(deliveries, 'failed')

  t.equal((await fetch(`${api.url}/job-progress/webhooks/dead`)).status, 403, 'not without authorization')
  const list = await (await fetch(`${api.url}/job-progress/webhooks/dead`, { headers: { 'x-admin': 'yes' } })).json() as any
  t.equal(list.total, 1)
  const [dead] = list.deliveries
  t.equal(dead.job_id, job.body.job_id)
  t.equal(dead.attempts, 2)
  t.equal(dead.error, 'HTTP 500: ' + 'x'.repeat(16), 'the response body was read only up to maxResponseBytes')
  t.equal(dead.payload.status, 'succeeded')
  t.equal(dead.id, receiver.calls[0].headers['webhook-id'])

  t.equal((await fetch(`${api.url}/job-progress/webhooks/dead/msg_nope/replay`, { method: 'POST', headers: { 'x-admin': 'yes' } })).status, 404)
  up = true
  const replay = await fetch(`${api.url}/job-progress/webhooks/dead/${dead.id as string}/replay`, { method: 'POST', headers: { 'x-admin': 'yes' } })
  t.equal(replay.status, 202)
  const calls = await receiver.waitCalls(3)
  await stateOf(deliveries, 'completed')
  t.equal(calls[2].headers['webhook-id'], dead.id, 'the replay keeps the delivery id')
  t.ok(calls[2].verified[0])
  const after = await (await fetch(`${api.url}/job-progress/webhooks/dead`, { headers: { 'x-admin': 'yes' } })).json() as any
  t.equal(after.total, 0, 'no longer dead')
})

t.test('options: a webhook needs a whsec_ secret', async (t) => {
  const redis = await redisFor(t)
  await t.rejects(startApp(t, redis, { kinds: { batch: { webhook: { url: 'https://example.com' } } } }), errors.InvalidOptionError)
  await t.rejects(startApp(t, redis, { kinds: { batch: { webhook: { url: 'https://example.com' } } }, webhooks: { secret: 'whsec_***' } }), /must be followed by base64/)
  await t.rejects(startApp(t, redis, { kinds: { batch: { webhook: { url: 'https://example.com' } } }, webhooks: { secret: 'plain', lookup: 3 as never } }), /^fastify-job-progress: `webhooks\.secret` must be a `whsec_` secret or an array of them \(newest first\); `webhooks\.lookup` must be a function$/)
})
