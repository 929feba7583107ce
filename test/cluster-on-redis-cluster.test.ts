import t from 'tap'
import { Cluster, sharedCluster } from './helpers/cluster'
import { connect, lines, upload } from './helpers/index'
import { isFinal, multiInstanceCases } from './helpers/multi-instance'
import { RedisCluster } from './helpers/redis-cluster'

// The multi-instance cases of test/cluster.test.ts (2 API instances of the example, a worker
// process, nginx in front) on a real Redis Cluster (3 masters, 3 replicas) instead of one
// redis-server: the example connects with REDIS_CLUSTER_NODES, BullMQ uses the hash-tagged prefix
// and per-job channels go over sharded pub/sub. One cluster serves every case of the file.

t.test('on a Redis Cluster', async (t) => {
  const redisCluster = await RedisCluster.start(t)
  // The cases that kill nothing and need no settings of their own share one set of processes; it
  // stops before a case starts processes of its own, whose jobs its worker would otherwise take.
  const shared = sharedCluster(t, { nginx: true, redisCluster })

  t.test("the cluster's view: a watched job's channel is subscribed on its own shard only, sharded, by the watching instance", async (t) => {
    const c = await shared()
    const [a, b] = c.apis
    const up = await upload(`${a.url}/batch/upload`, lines(100))
    const channel = `jp:batch:{${String(up.body.job_id)}}`
    const watcher = connect(t, `${b.ws}/ws/batch/${String(up.body.job_id)}`, { cookie: up.cookie })
    await watcher.waitFor(() => true)
    const owner = await redisCluster.masterOf(channel)
    const counts = await Promise.all((await redisCluster.masters()).map(async port => {
      const node = redisCluster.node(port)
      try {
        const sharded = await node.call('PUBSUB', 'SHARDNUMSUB', channel) as [string, number]
        const classic = await node.call('PUBSUB', 'NUMSUB', channel) as [string, number]
        return { port, sharded: Number(sharded[1]), classic: Number(classic[1]) }
      } finally {
        node.disconnect()
      }
    }))
    t.same(counts.filter(n => n.sharded > 0).map(n => n.port), [owner], 'sharded subscriptions on the owning shard only')
    t.equal(counts.find(n => n.port === owner)?.sharded, 1, 'one: B\'s, A watches nothing')
    t.ok(counts.every(n => n.classic === 0), 'no classic subscription anywhere (nothing goes over the cluster bus)')
    t.match(await watcher.waitFor(isFinal), { status: 'complete', processed: 100 })
  })

  multiInstanceCases(t, async (t, opts) => {
    await shared.stop()
    return await Cluster.start(t, { ...opts, redisCluster })
  }, shared)
})
