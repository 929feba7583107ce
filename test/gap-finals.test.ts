import t from 'tap'
import { Queue } from 'bullmq'
import { Redis } from 'ioredis'
import { existsSync } from 'node:fs'
import { finalKey } from '../lib/bridge/bridge'
import { PAGE } from '../lib/bridge/final-recovery'
import { deliveryId } from '../lib/channels/webhooks/webhooks'
import type { JobProgressOptions } from '../lib/index'
import { eventually, lines, redisFor, startApp, startWorker, tempDir, uploadAs } from './helpers/index'
import { newSecret, Receiver } from './helpers/receiver'

const SECRET = newSecret()

t.test('finals trimmed from the stream while no bridge ran reach webhooks, upload cleanup and the feed; a removed job is counted', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const receiver = await Receiver.start(t, [SECRET])
  const probe = new Redis(redis.port, '127.0.0.1')
  t.teardown(() => probe.disconnect())
  const opts: Partial<JobProgressOptions> = {
    uploadDir,
    apiKeys: { 'key-alice': 'alice' },
    kinds: {
      batch: { webhook: { url: receiver.url + '/hook' } },
      // Its jobs leave no trace once done: a final lost with the stream cannot be recovered.
      dataset: { jobOptions: { removeOnComplete: true } }
    },
    webhooks: { secret: SECRET, backoffMs: 300, jitter: 0, attempts: 3 },
    metrics: { path: '/metrics' }
  }

  // A bridge makes the group and the queue's gap record, then every bridge stops.
  const first = await startApp(t, redis, opts)
  await first.app.close()
  // Uploads and cancels go through an instance without a bridge: nobody reads the stream.
  const api = await startApp(t, redis, { ...opts, bridge: { enabled: false } })
  const batch = api.app.jobProgress.queues.get('batch') as Queue
  const dataset = api.app.jobProgress.queues.get('dataset') as Queue
  const keys = api.app.jobProgress.keys
  const completed = await uploadAs(api, 'key-alice', 'batch', lines(2))
  const failed = await uploadAs(api, 'key-alice', 'batch', lines(2, 1))
  const cancelled = await uploadAs(api, 'key-alice', 'batch', lines(2))
  const removed = await uploadAs(api, 'key-alice', 'dataset', lines(1))
  const files = new Map<string, string>()
  for (const [queue, jobId] of [[batch.name, completed], [batch.name, failed], [batch.name, cancelled]]) {
    files.set(jobId, api.storage.localPath?.(await probe.get(keys.upload(queue, jobId)) as string) as string)
  }
  const cancel = await fetch(`${api.url}/batch/${cancelled}/cancel`, { method: 'POST', headers: { authorization: 'Bearer key-alice' } })
  t.equal(cancel.status, 202, 'cancelled while queued')
  startWorker(t, redis, 'batch', uploadDir)
  startWorker(t, redis, 'dataset', uploadDir)
  t.ok(await eventually(async () => (await batch.getJobState(completed)) === 'completed' && (await batch.getJobState(failed)) === 'failed' && await probe.exists(keys.job(dataset.name, removed)) === 0 && await probe.exists(keys.upload(dataset.name, removed)) === 1, 15_000), 'the jobs ended with no bridge running')

  // The stream is trimmed past the group: every entry of those finals is gone.
  for (const queue of [batch, dataset]) await probe.xtrim(keys.queueKey(queue.name, 'events'), 'MAXLEN', 0)
  t.equal(await probe.xlen(keys.queueKey(batch.name, 'events')), 0)

  const feed = new Redis(redis.port, '127.0.0.1')
  t.teardown(() => feed.disconnect())
  const feedSeen: Array<{ job_id: string, status: string }> = []
  feed.on('pmessage', (_pattern, _channel, raw: string) => feedSeen.push(JSON.parse(raw)))
  await feed.psubscribe('jp:owner:of:*')

  const started = Date.now()
  const second = await startApp(t, redis, opts)
  const calls = await receiver.waitCalls(3)
  const delivered = Date.now() - started
  const bodies = new Map(calls.map(c => [JSON.parse(c.body).job_id as string, { id: c.headers['webhook-id'], status: JSON.parse(c.body).status as string }]))
  t.same(bodies.get(completed)?.status, 'succeeded')
  t.same(bodies.get(failed)?.status, 'failed')
  t.same(bodies.get(cancelled)?.status, 'cancelled')
  const url = receiver.url + '/hook'
  t.equal(bodies.get(completed)?.id, deliveryId(batch.name, completed, finalKey('completed', 1), url), 'the webhook-id the stream\'s path gives: job, state, attempt')
  t.equal(bodies.get(failed)?.id, deliveryId(batch.name, failed, finalKey('failed', 1), url))
  t.equal(bodies.get(cancelled)?.id, deliveryId(batch.name, cancelled, finalKey('cancelled', 1), url))
  t.ok(calls.every(c => c.verified[0]), 'signed')

  for (const [jobId, file] of files) {
    t.ok(await eventually(() => !existsSync(file), 5_000), `the upload of ${jobId} is removed`)
    // The upload goes first, then its marker (a crash between the two leaves it to the sweep).
    t.ok(await eventually(async () => await probe.exists(keys.upload(batch.name, jobId)) === 0, 5_000), 'with its marker')
  }
  t.ok(await eventually(() => [completed, failed, cancelled].every(id => feedSeen.some(m => m.job_id === id && ['succeeded', 'failed', 'cancelled'].includes(m.status))), 5_000), 'the feed tells each final')
  t.ok(await eventually(async () => /job_progress_finals_gone_total\{queue="dataset"\} 1/.test(await (await fetch(`${second.url}/metrics`)).text()), 5_000), 'the removed job is counted')
  t.ok(await eventually(async () => (await probe.hkeys(keys.finalGaps(batch.name))).every(f => !f.startsWith('w:')), 5_000), 'the window leaves the record once recovered')

  // Deliveries settle; then nothing more comes: one delivery per final, by id.
  const deliveries = new Queue('jp-webhooks', { connection: { host: '127.0.0.1', port: redis.port } })
  t.teardown(async () => await deliveries.close())
  t.ok(await eventually(async () => (await deliveries.getJobCounts('completed')).completed === 3, 5_000))
  t.equal(new Set(receiver.calls.map(c => c.headers['webhook-id'])).size, 3, 'exactly once by webhook-id')
  t.equal((await deliveries.getJobCounts('completed', 'waiting', 'delayed', 'active')).completed, 3)

  // The stream's own path gives a final the same kind of id: job, state, attempt.
  const live = await uploadAs(second, 'key-alice', 'batch', lines(1))
  await receiver.waitCalls(4)
  t.equal(receiver.calls[3].headers['webhook-id'], deliveryId(batch.name, live, finalKey('completed', 1), url), 'the normal path\'s webhook-id')
  t.comment(`all finals delivered ${delivered} ms after the start; pages of ${PAGE}`)
})
