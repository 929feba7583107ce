import t from 'tap'
import Fastify from 'fastify'
import type { Redis } from 'ioredis'
import { createJobWorker, DiskStorage, jobProgress, type JobProgressOptions } from '../lib/index'
import { connect, gate, lines, tempDir, upload } from './helpers/index'
import { RedisCluster } from './helpers/redis-cluster'

// The plugin on a real Redis Cluster (3 masters, 3 replicas): BullMQ on the same cluster with a
// hash-tagged prefix, per-job channels on sharded pub/sub, and masters killed mid-job.

const PREFIX = '{jpc}'

async function appOn (t: { teardown: (fn: () => unknown) => void }, cluster: RedisCluster, uploadDir: string, opts: Partial<JobProgressOptions> = {}) {
  const connection = cluster.client()
  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection,
    prefix: PREFIX,
    kinds: { batch: {} },
    session: { secret: 'a-test-secret-of-enough-length' },
    throttleMs: 0,
    sweepReadsPerSecond: 0,
    bridge: { claimIdleMs: 1000, claimIntervalMs: 500 },
    uploadDir,
    ...opts
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => {
    await app.close()
    connection.disconnect()
  })
  const { port } = app.server.address() as { port: number }
  return { app, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}` }
}

function workerOn (t: { teardown: (fn: () => unknown) => void }, cluster: RedisCluster, uploadDir: string, beforeItem?: (i: number) => Promise<void>) {
  const connection = cluster.client()
  const worker = createJobWorker({ kind: 'batch', prefix: PREFIX, connection: connection as unknown as Redis, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    const items = text.split('\n').filter(Boolean)
    for (let i = 0; i < items.length; i++) {
      await beforeItem?.(i)
      await ctx.report(i + 1, items.length)
    }
    return { lines: items.length }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    await worker.close(true)
    connection.disconnect()
  })
  return worker
}

t.test('on a cluster', async (t) => {
  const cluster = await RedisCluster.start(t)

  t.test('a prefix without a hash tag is refused at register, naming the fix', async (t) => {
    const connection = cluster.client()
    t.teardown(() => connection.disconnect())
    const app = Fastify({ logger: false })
    t.teardown(async () => await app.close())
    await t.rejects(async () => {
      await app.register(jobProgress, { connection, kinds: { batch: {} }, session: { secret: 'a-test-secret-of-enough-length' } })
      await app.ready()
    }, /prefix: '\{bull\}'/)
  })

  t.test('a channel watched here is not subscribed again: the cluster client\'s list of channels to restore stays one per channel', async (t) => {
    const { ShardedBroker } = await import('../lib/broker/sharded')
    const commands = cluster.client()
    const subscriber = cluster.client()
    t.teardown(() => { commands.disconnect(); subscriber.disconnect() })
    const broker = new ShardedBroker(commands, subscriber)
    // The list ioredis re-subscribes after a slot refresh (read from its internals: if they move,
    // this fails here, not silently).
    const listed = (): number => {
      const group = (subscriber as unknown as { shardedSubscribers?: { channels?: Map<number, string[]> } }).shardedSubscribers
      if (group?.channels === undefined) throw new Error('the cluster client keeps its sharded channels elsewhere now')
      let n = 0
      for (const list of group.channels.values()) n += list.length
      return n
    }
    await broker.subscribe(['jp:batch:{a}', 'jp:batch:{b}'])
    // Refused probes of a watched job, and opens by its owner, each subscribe its channel again.
    for (let i = 0; i < 50; i++) await broker.subscribe(['jp:batch:{a}'])
    t.equal(listed(), 2)
    await broker.unsubscribe(['jp:batch:{a}'])
    await broker.subscribe(['jp:batch:{a}'])
    t.equal(listed(), 2, 'let go and subscribed again: still once')
  })

  t.test('progress streams over sharded pub/sub, on the shard of the job\'s channel only', async (t) => {
    const uploadDir = await tempDir(t)
    const { url } = await appOn(t, cluster, uploadDir)
    const hold = gate()
    workerOn(t, cluster, uploadDir, async (i) => { if (i === 2) await hold.promise })
    const up = await upload(`${url}/batch/upload`, lines(4))
    t.equal(up.status, 202)
    const client = connect(t, `ws://${new URL(url).host}${String(up.body.ws_url)}`, { cookie: up.cookie })
    await client.waitFor(m => m.processed === 2, 20_000)
    const channel = `jp:batch:{${up.body.job_id}}`
    const owner = await cluster.masterOf(channel)
    const node = cluster.node(owner)
    t.teardown(() => node.disconnect())
    const numsub = await node.call('PUBSUB', 'SHARDNUMSUB', channel) as [string, number]
    t.equal(Number(numsub[1]), 1, 'one sharded subscription on the shard that owns the channel')
    hold.open()
    const final = await client.waitFor(m => m.status === 'complete', 20_000)
    t.equal(final.processed, 4)
    t.equal((await client.closed).code, 1000)
  })

  t.test('the master owning the watched channel\'s slot is killed mid-job: its replica takes over, the watcher ends complete', async (t) => {
    const uploadDir = await tempDir(t)
    const { url } = await appOn(t, cluster, uploadDir)
    const hold = gate()
    workerOn(t, cluster, uploadDir, async (i) => { if (i === 1) await hold.promise })
    // A job whose channel lives on another master than the queue: the kill hits pub/sub only.
    let up = await upload(`${url}/batch/upload`, lines(3))
    const queueMaster = await cluster.masterOf(`${PREFIX}:batch:events`)
    for (let i = 0; i < 20 && await cluster.masterOf(`jp:batch:{${up.body.job_id}}`) === queueMaster; i++) {
      up = await upload(`${url}/batch/upload`, lines(3), { cookie: up.cookie })
    }
    const channelMaster = await cluster.masterOf(`jp:batch:{${up.body.job_id}}`)
    t.not(channelMaster, queueMaster)
    const client = connect(t, `ws://${new URL(url).host}${String(up.body.ws_url)}`, { cookie: up.cookie })
    await client.waitFor(m => m.status === 'processing', 20_000)
    await cluster.kill(channelMaster)
    hold.open()
    const final = await client.waitFor(m => m.status === 'complete', 40_000)
    t.equal(final.processed, 3)
    // The job can end before the cluster even noticed the kill (it then still says ok): wait for
    // the replica to take over, or the next test's kill leaves two masters down and no majority.
    await cluster.waitFailover(`jp:batch:{${String(up.body.job_id)}}`, channelMaster)
    await cluster.waitHealthy()
  })

  t.test('the master owning the queue\'s slot is killed mid-job while the worker keeps reporting: its replica takes over, the reports wait for it and the watcher ends complete', async (t) => {
    const uploadDir = await tempDir(t)
    const { url } = await appOn(t, cluster, uploadDir)
    const hold = gate()
    // Reports every 100 ms right through the failover (about 2 to 4 s): one made while the shard
    // is away waits for it instead of failing the job.
    workerOn(t, cluster, uploadDir, async (i) => {
      if (i === 1) await hold.promise
      if (i > 1) await new Promise(resolve => setTimeout(resolve, 100))
    })
    const up = await upload(`${url}/batch/upload`, lines(60))
    t.equal(up.status, 202)
    const client = connect(t, `ws://${new URL(url).host}${String(up.body.ws_url)}`, { cookie: up.cookie })
    await client.waitFor(m => m.processed === 1, 20_000)
    const queueMaster = await cluster.masterOf(`${PREFIX}:batch:events`)
    await cluster.kill(queueMaster)
    hold.open()
    await cluster.waitFailover(`${PREFIX}:batch:events`, queueMaster)
    const final = await client.waitFor(m => m.status !== 'processing', 60_000)
    t.match(final, { status: 'complete', processed: 60 })
  })
})
