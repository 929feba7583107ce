/**
 * Redis work per progress event at 1, 2 and 4 instances, on one redis-server and on a Redis
 * Cluster (3 masters), in one run. JOBS jobs are held active by a BullMQ worker that reports
 * progress RATE times a second each for SECONDS; one per-job socket watches each job, all on the
 * first instance (the others run, relay from the queue's event stream and watch nothing).
 * `INFO commandstats` deltas are taken on every node (the INFO calls themselves left out) and
 * divided by the progress events; a run with no instance at all gives the worker's own work
 * (`updateProgress`), and "plugin" is the rest.
 *
 * On the cluster the job ids are chosen so that every job's channel lives on one master and the
 * queue (its hash-tagged keys and event stream) on another: the table shows the work on the
 * queue's shard, on the channels' shard and on the third, which should be ~0 (sharded pub/sub
 * sends a message to its channel's shard only, not over the cluster bus to every node).
 *
 *   npx tsx bench/redis-per-event.ts [--jobs 20] [--rate 10] [--seconds 5] [--instances 1,2,4]
 */
import Fastify, { type FastifyInstance } from 'fastify'
import { Queue, Worker, type Job } from 'bullmq'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { Redis, type Cluster } from 'ioredis'
import { jobProgress } from '../lib/index'
import { slotOf } from '../lib/core/slot'
import { RedisCluster } from '../test/helpers/redis-cluster'
import { BenchRedis, readCounters, redisDelta } from './lib/redis'

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : fallback
}
const JOBS = Number(arg('jobs', '20'))
const RATE = Number(arg('rate', '10'))
const SECONDS = Number(arg('seconds', '5'))
const INSTANCES = arg('instances', '1,2,4').split(',').map(Number)
const PREFIX = '{bench}'
const QUEUE = 'batch'

const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

interface Topology {
  name: string
  /** Nodes to count on, with the role shown in the table. */
  nodes: Array<{ role: string, redis: Redis }>
  connection: () => Redis | Cluster
  jobIds: () => Promise<string[]>
  stop: () => Promise<void>
}

async function standalone (): Promise<Topology> {
  const server = await BenchRedis.start()
  process.on('exit', () => server.kill())
  const info = new Redis(server.port, '127.0.0.1')
  const made: Redis[] = []
  return {
    name: `redis-server ${BenchRedis.version()}`,
    nodes: [{ role: 'the server', redis: info }],
    connection: () => {
      const r = new Redis(server.port, '127.0.0.1', { maxRetriesPerRequest: null })
      made.push(r)
      return r
    },
    jobIds: async () => Array.from({ length: JOBS }, () => randomUUID()),
    stop: async () => {
      for (const r of made) r.disconnect()
      info.disconnect()
      await server.stop()
    }
  }
}

async function cluster (): Promise<Topology> {
  const downs: Array<() => unknown> = []
  const rc = await RedisCluster.start({ teardown: (fn) => { downs.push(fn) } }, { replicas: 0, persist: false })
  process.on('exit', () => { for (const port of rc.ports) rc.kill(port).catch(() => {}) })
  const queueMaster = await rc.masterOf(`${PREFIX}:${QUEUE}:events`)
  const masters = await rc.masters()
  const channelMaster = masters.find(p => p !== queueMaster) as number
  const other = masters.find(p => p !== queueMaster && p !== channelMaster) as number
  const made: Cluster[] = []
  const probe = rc.node(queueMaster)
  const ranges = await probe.cluster('SLOTS') as unknown as Array<[number, number, [string, number]]>
  probe.disconnect()
  const onChannelMaster = (slot: number): boolean => ranges.some(([from, to, master]) => slot >= from && slot <= to && Number(master[1]) === channelMaster)
  const nodes = [
    { role: 'queue\'s shard', redis: rc.node(queueMaster) },
    { role: 'channels\' shard', redis: rc.node(channelMaster) },
    { role: 'third shard', redis: rc.node(other) }
  ]
  return {
    name: 'Redis Cluster, 3 masters',
    nodes,
    connection: () => {
      const c = rc.client()
      made.push(c)
      return c
    },
    jobIds: async () => {
      // Drawn until every job's channel hashes to a slot of the channels' master.
      const out: string[] = []
      while (out.length < JOBS) {
        const id = randomUUID()
        if (onChannelMaster(slotOf(`jp:${QUEUE}:{${id}}`))) out.push(id)
      }
      return out
    },
    stop: async () => {
      for (const c of made) c.disconnect()
      for (const n of nodes) n.redis.disconnect()
      for (const down of downs.reverse()) await down()
    }
  }
}

async function startInstances (topo: Topology, n: number): Promise<{ apps: FastifyInstance[], port: number }> {
  const apps: FastifyInstance[] = []
  for (let i = 0; i < n; i++) {
    const app = Fastify({ logger: false })
    await app.register(jobProgress, {
      connection: topo.connection() as Redis,
      prefix: PREFIX,
      kinds: { [QUEUE]: {} },
      getOwner: () => 'bench',
      throttleMs: 0,
      maxConnectionsPerOwner: 100_000
    })
    await app.listen({ port: 0, host: '127.0.0.1' })
    apps.push(app)
  }
  const port = apps.length > 0 ? (apps[0].server.address() as { port: number }).port : 0
  return { apps, port }
}

interface Row { topology: string, instances: number, events: number, received: number, perNode: Array<{ role: string, commands: number, byCommand: Record<string, number> }> }

async function measure (topo: Topology, instances: number): Promise<Row> {
  const ids = await topo.jobIds()
  const queue = new Queue(QUEUE, { connection: topo.connection() as Redis, prefix: PREFIX })
  await queue.addBulk(ids.map(jobId => ({ name: QUEUE, data: { owner: 'bench' }, opts: { jobId } })))
  const worker = new Worker(QUEUE, null, { connection: topo.connection() as Redis, prefix: PREFIX, autorun: false, lockDuration: 3_600_000 })
  const jobs: Job[] = []
  while (jobs.length < ids.length) {
    const job = await worker.getNextJob('bench', { block: false })
    if (job === undefined) throw new Error('fewer jobs active than added')
    jobs.push(job)
  }
  const { apps, port } = await startInstances(topo, instances)
  let received = 0
  const sockets: WebSocket[] = []
  if (instances > 0) {
    await Promise.all(ids.map(async id => await new Promise<void>((resolve, reject) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/${QUEUE}/${id}`)
      sockets.push(ws)
      ws.once('message', () => {
        ws.on('message', () => { received++ })
        resolve()
      })
      ws.once('error', reject)
    })))
  }
  await sleep(500)
  const before = await Promise.all(topo.nodes.map(async n => await readCounters(n.redis)))
  // Each job reports RATE times a second, the jobs staggered over the period.
  let events = 0
  const total = RATE * SECONDS
  const started = Date.now()
  await Promise.all(jobs.map(async (job, j) => {
    await sleep((1000 / RATE) * (j / jobs.length))
    for (let k = 1; k <= total; k++) {
      const due = started + (k - 1) * (1000 / RATE) + (1000 / RATE) * (j / jobs.length)
      if (due > Date.now()) await sleep(due - Date.now())
      await job.updateProgress({ processed: k, total })
      events++
    }
  }))
  // Let the last events through the bridges before counting.
  await sleep(1000)
  const after = await Promise.all(topo.nodes.map(async n => await readCounters(n.redis)))
  for (const ws of sockets) ws.terminate()
  await Promise.all(apps.map(async app => await app.close()))
  await worker.close(true)
  await queue.obliterate({ force: true }).catch(() => {})
  await queue.close()
  return {
    topology: topo.name,
    instances,
    events,
    received,
    perNode: topo.nodes.map((n, i) => {
      const d = redisDelta(before[i], after[i])
      return { role: n.role, commands: d.commands, byCommand: d.byCommand }
    })
  }
}

const fmt = (x: number): string => x.toFixed(2)

async function main (): Promise<void> {
  process.stdout.write(`Redis work per progress event: ${JOBS} jobs × ${RATE}/s for ${SECONDS} s, one socket per job, all on the first instance\n`)
  for (const make of [standalone, cluster]) {
    const topo = await make()
    try {
      const base = await measure(topo, 0)
      const roles = topo.nodes.map(n => n.role)
      process.stdout.write(`\n${topo.name}; the worker's own updateProgress: ${roles.map((r, i) => `${r} ${fmt(base.perNode[i].commands / base.events)}`).join(', ')} commands/event\n\n`)
      process.stdout.write(`| instances | events | delivered | ${roles.map(r => `plugin on ${r}`).join(' | ')} | plugin's commands on the busiest node |\n| --- | --- | --- | ${roles.map(() => '---').join(' | ')} | --- |\n`)
      for (const n of INSTANCES) {
        const row = await measure(topo, n)
        const plugin = row.perNode.map((p, i) => p.commands / row.events - base.perNode[i].commands / base.events)
        const busiest = row.perNode[plugin.indexOf(Math.max(...plugin))]
        const mine = Object.entries(busiest.byCommand)
          .map(([name, calls]) => [name, calls / row.events - (base.perNode[row.perNode.indexOf(busiest)].byCommand[name] ?? 0) / base.events] as const)
          .filter(([, per]) => per > 0.01).sort((a, b) => b[1] - a[1]).map(([name, per]) => `${name} ${fmt(per)}`).join(', ')
        process.stdout.write(`| ${n} | ${row.events} | ${row.received} | ${plugin.map(fmt).join(' | ')} | ${mine} |\n`)
      }
    } finally {
      await topo.stop()
    }
  }
}

main().then(() => process.exit(0), (err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`)
  process.exit(1)
})
