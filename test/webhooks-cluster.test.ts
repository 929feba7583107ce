import t, { type Test } from 'tap'
import { Queue } from 'bullmq'
import { Cluster } from './helpers/cluster'
import { eventually, lines, upload } from './helpers/index'
import { newSecret, Receiver, selfSigned } from './helpers/receiver'

// Real processes of the example (WEBHOOK_URL, WEBHOOK_SECRET), a real receiver, one Redis.
const SECRET = newSecret()

function deliveries (t: Test, cluster: Cluster): Queue {
  const queue = new Queue('jp-webhooks', { connection: { host: '127.0.0.1', port: cluster.redis.port } })
  t.teardown(async () => await queue.close())
  return queue
}

t.test('2 API instances and a job that completes: one delivery, not two (over https)', async (t) => {
  const tls = await selfSigned(t)
  const receiver = await Receiver.start(t, [SECRET], tls)
  // The instances trust the receiver's certificate the way an operator would add a private CA.
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, env: { WEBHOOK_URL: receiver.url + '/hook', WEBHOOK_SECRET: SECRET, NODE_EXTRA_CA_CERTS: tls.certFile } })
  const queue = deliveries(t, cluster)
  const jobs = await Promise.all([0, 1, 0, 1].map(async i => await upload(`${cluster.apis[i].url}/batch/upload`, lines(3))))
  await receiver.waitCalls(4)
  const redis = cluster.redis.client()
  t.teardown(() => redis.disconnect())
  // Every event was read and acknowledged by one of the two bridges, and every delivery is done.
  const settled = await eventually(async () => {
    const [pending] = await redis.xpending('bull:batch:events', 'jp-bridge') as [number]
    const counts = await queue.getJobCounts()
    return pending === 0 && counts.completed === 4 && counts.waiting + counts.active + counts.delayed === 0
  }, 15_000, 100)
  t.ok(settled, 'both bridges done, four deliveries made')
  t.equal(receiver.calls.length, 4, 'one call per job, from either instance')
  t.same(receiver.calls.map(c => JSON.parse(c.body).job_id).sort(), jobs.map(j => j.body.job_id).sort())
  t.ok(receiver.calls.every(c => c.verified[0] && JSON.parse(c.body).status === 'succeeded'))
})

t.test('SIGKILL the instance during a delivery, and while one waits for its retry: the other delivers both', async (t) => {
  const receiver = await Receiver.start(t, [SECRET])
  // One job's first try hangs (in flight when the instance dies), the other's fails (waits 4 s).
  let hanging = ''
  receiver.answer = (call) => {
    const jobId = JSON.parse(call.body).job_id as string
    if (receiver.calls.filter(c => JSON.parse(c.body).job_id === jobId).length > 1) return { status: 200 }
    if (hanging === '') {
      hanging = jobId
      return 'hang'
    }
    return { status: 500 }
  }
  const cluster = await Cluster.start(t, { apis: 1, workers: 1, env: { WEBHOOK_URL: receiver.url, WEBHOOK_SECRET: SECRET, STALLED_INTERVAL_MS: '500', WEBHOOK_BACKOFF_MS: '4000' } })
  const queue = deliveries(t, cluster)
  const [a] = cluster.apis
  await upload(`${a.url}/batch/upload`, lines(1))
  await upload(`${a.url}/batch/upload`, lines(1))
  await receiver.waitCalls(2)
  t.equal(receiver.calls.length, 2, 'both first tries came from the only instance')
  const b = await cluster.startApi()
  await a.proc.stop('SIGKILL')
  const calls = await receiver.waitCalls(4, 20_000)
  t.ok(await eventually(async () => (await queue.getJobCounts('completed')).completed === 2, 10_000), 'both delivered')
  t.equal(calls.length, 4)
  for (const first of calls.slice(0, 2)) {
    const again = calls.slice(2).find(c => c.headers['webhook-id'] === first.headers['webhook-id'])
    t.ok(again !== undefined, 'retried under the same webhook-id by the surviving instance')
    t.ok(again?.verified[0])
  }
  t.ok(b.proc.running)
})
