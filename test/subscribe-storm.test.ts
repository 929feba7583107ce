import t from 'tap'
import { jobsProtocol } from '../lib/index'
import type { Labels, MetricName, Telemetry } from '../lib/core/telemetry'
import { connect, redisFor, startApp, upload } from './helpers/index'
import { RedisCluster } from './helpers/redis-cluster'
import { Keys } from '../lib/core/keys'
import { readOpens, readOwners, writeOwner, type SnapshotTarget } from '../lib/core/snapshot'
import { slotOf } from '../lib/core/slot'

// A socket that subscribes many jobs at once does not open them one after the other: its opens
// run side by side, so they share SUBSCRIBEs and pipelined snapshot reads (a few round trips for
// the lot, not a few per job); each job's owner is checked first inside its snapshot read, not
// in a read of its own. An unsubscribe still orders what follows it.

const PATH = '/ws/jobs'

t.test('100 subscribes sent at once: read in a few pipelined batches, every job answered once', async (t) => {
  const batches: number[] = []
  const ownerBatches: number[] = []
  const subscribes: number[] = []
  const telemetry: Telemetry = {
    count (name: MetricName, labels: Labels = {}, n = 1) {
      if (name === 'snapshotReads' && labels.reason === 'open') batches.push(n)
      if (name === 'redisCommands' && labels.op === 'owner') ownerBatches.push(n)
      if (name === 'redisCommands' && labels.op === 'subscribe') subscribes.push(n)
    },
    observe () {},
    gauge () {}
  }
  const redis = await redisFor(t)
  const { url, ws } = await startApp(t, redis, { telemetry, protocols: [jobsProtocol({ path: PATH })] })
  const first = await upload(`${url}/batch/upload`, '1\n')
  const ids = [String(first.body.job_id)]
  for (let i = 1; i < 100; i++) ids.push(String((await upload(`${url}/batch/upload`, '1\n', { cookie: first.cookie })).body.job_id))

  const client = connect(t, `${ws}${PATH}`, { cookie: first.cookie })
  await client.waitFor(m => m.type === 'connected')
  for (const id of ids) client.send({ action: 'subscribe', job_id: id })
  await client.waitFor(() => new Set(client.messages.filter(m => m.type === 'job_update').map(m => m.job_id)).size === 100, 20_000)
  // A bare job id may be of either kind: both are opened at once, each read checking the owner,
  // instead of a lookup of the kind before the open.
  t.equal(batches.reduce((a, b) => a + b, 0), 200, 'one snapshot read per job and kind')
  t.ok(batches.length <= 10, `100 opens read in ${batches.length} pipelined batches (one after the other: 100)`)
  // The owner is checked inside the snapshot script: no read of its own before it.
  t.equal(ownerBatches.length, 0, 'no separate owner read')
  t.equal(subscribes.length, batches.length, 'one SUBSCRIBE per batch, before its read')

  // An unsubscribe then a subscribe of the same job: answered in that order.
  client.send({ action: 'unsubscribe', job_id: ids[0] })
  client.send({ action: 'subscribe', job_id: ids[0] })
  const seen = client.messages.length
  await client.waitFor(m => client.messages.indexOf(m) >= seen && m.type === 'subscribed' && m.job_id === ids[0])
  const order = client.messages.slice(seen).filter(m => m.job_id === ids[0]).map(m => m.type)
  t.same(order.slice(0, 2), ['unsubscribed', 'subscribed'])
})

t.test('a subscribe that starts at once and an unsubscribe of the same job sent right after it: answered in that order, nothing left watched', async (t) => {
  const redis = await redisFor(t)
  const { app, url, ws } = await startApp(t, redis, { protocols: [jobsProtocol({ path: PATH })] })
  const up = await upload(`${url}/batch/upload`, '1\n')
  const id = String(up.body.job_id)
  const client = connect(t, `${ws}${PATH}`, { cookie: up.cookie })
  await client.waitFor(m => m.type === 'connected')
  // In one frame batch: the subscribe has nothing to wait for and starts at once, the
  // unsubscribe, and the subscribe after it, wait for it.
  client.send({ action: 'subscribe', job_id: id })
  client.send({ action: 'unsubscribe', job_id: id })
  client.send({ action: 'subscribe', job_id: id })
  client.send({ action: 'unsubscribe', job_id: id })
  await client.waitFor(() => client.messages.filter(m => m.type === 'unsubscribed' && m.job_id === id).length === 2)
  const order = client.messages.filter(m => m.job_id === id && (m.type === 'subscribed' || m.type === 'unsubscribed')).map(m => m.type)
  t.same(order, ['subscribed', 'unsubscribed', 'subscribed', 'unsubscribed'], 'each step after the one asked before it')
  t.equal(app.jobProgress.stats().watchedJobs, 0, 'no subscription left behind')
})

t.test('on a Redis Cluster, one batch of owner reads over queues in different slots: one pipeline per slot, every owner in its place', async (t) => {
  const cluster = await RedisCluster.start(t, { replicas: 0, persist: false })
  const client = cluster.client()
  t.teardown(async () => { await client.quit() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const targets: SnapshotTarget[] = []
  for (const queue of ['{a}', '{b}', '{c}', '{d}']) {
    for (let i = 0; i < 3; i++) {
      const target = { kind: 'batch', queue, jobId: `${queue}-${i}` }
      targets.push(target)
      if (i < 2) await client.hset(keys.job(queue, target.jobId), 'timestamp', '1', 'jpOwner', `owner-${queue}-${i}`)
    }
  }
  t.ok(new Set(targets.map(x => slotOf(keys.job(x.queue, x.jobId)))).size > 1, 'the jobs span slots')
  const owners = await readOwners(client, keys, targets)
  t.same(owners, targets.map(x => x.jobId.endsWith('-2') ? null : `owner-${x.queue}-${x.jobId.slice(-1)}`))
})

t.test('on a Redis Cluster, one batch of opens over queues in different slots: one script per queue, one pipeline per slot, each owner checked in its place', async (t) => {
  const cluster = await RedisCluster.start(t, { replicas: 0, persist: false })
  const client = cluster.client()
  t.teardown(async () => { await client.quit() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const targets: SnapshotTarget[] = []
  const owners: Array<string | undefined> = []
  for (const queue of ['{a}', '{b}', '{c}', '{d}']) {
    for (let i = 0; i < 4; i++) {
      const target = { kind: 'batch', queue, jobId: `${queue}-${i}` }
      targets.push(target)
      // 0: its owner's (the field), 1: its owner's (data.owner only), 2: somebody else's, 3: no such job.
      if (i === 0 || i === 2) await client.hset(keys.job(queue, target.jobId), 'timestamp', '1', 'data', '{}')
      if (i === 0 || i === 2) await writeOwner(client, keys, queue, target.jobId, `owner-${queue}`)
      if (i === 1) await client.hset(keys.job(queue, target.jobId), 'timestamp', '1', 'data', JSON.stringify({ owner: `owner-${queue}` }))
      owners.push(i === 2 ? 'mallory' : `owner-${queue}`)
    }
  }
  t.ok(new Set(targets.map(x => slotOf(keys.job(x.queue, x.jobId)))).size > 1, 'the jobs span slots')
  const read = await readOpens(client, keys, targets, owners)
  t.same(read.map(r => r instanceof Error ? 'error' : r === null ? null : r.owner), targets.map(x => /-[01]$/.test(x.jobId) ? `owner-${x.queue}` : null),
    'each job answered in its place: its owner\'s (field or data.owner) read, somebody else\'s and a missing one null alike')
  t.match(read[0], { event: { state: 'queued', jobId: '{a}-0' } })
})
