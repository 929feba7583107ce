import t from 'tap'
import Fastify from 'fastify'
import type { Redis } from 'ioredis'
import { createJobWorker, DiskStorage, jobProgress, jobsProtocol, type JobProgressOptions } from '../lib/index'
import type { Labels, MetricName, Telemetry } from '../lib/core/telemetry'
import { slotOf } from '../lib/core/slot'
import { connect, gate, lines, tempDir, upload, type Client } from './helpers/index'
import { sse, type SseClient } from './helpers/sse'
import { RedisCluster } from './helpers/redis-cluster'

// Resharding on a real Redis Cluster: a slot moves to another master mid-job, the way an operator
// moves it (IMPORTING/MIGRATING, MIGRATE of its keys, SETSLOT NODE). The watching instance runs no
// bridge, so every event it shows came to it over sharded pub/sub (an instance's own bridge hands
// its events over without Redis): when the old owner drops the channel's subscription with a
// `sunsubscribe`, only the re-subscription and the re-read of what was missed keep its watchers
// going.

const PREFIX = '{jpr}'
const JOBS_PATH = '/ws/jobs'

interface Teardown { teardown: (fn: () => unknown) => void }

/** Counts what the plugin reports, so a test can see that it noticed a fault. */
function recorder (): Telemetry & { counts: Map<string, number> } {
  const counts = new Map<string, number>()
  return {
    counts,
    count (name: MetricName, labels: Labels = {}, n = 1) {
      const key = `${name}${JSON.stringify(labels)}`
      counts.set(key, (counts.get(key) ?? 0) + n)
    },
    observe () {},
    gauge () {}
  }
}

async function instance (t: Teardown, cluster: RedisCluster, uploadDir: string, opts: Partial<JobProgressOptions> = {}) {
  const connection = cluster.client()
  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection,
    prefix: PREFIX,
    kinds: { batch: {} },
    session: { secret: 'a-test-secret-of-enough-length' },
    throttleMs: 0,
    sweepReadsPerSecond: 0,
    protocols: [jobsProtocol({ path: JOBS_PATH })],
    uploadDir,
    ...opts
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => {
    await app.close()
    connection.disconnect()
  })
  const { port } = app.server.address() as { port: number }
  return { app, url: `http://127.0.0.1:${port}`, host: `127.0.0.1:${port}` }
}

function workerOn (t: Teardown, cluster: RedisCluster, uploadDir: string, beforeItem: (i: number) => Promise<void>) {
  const connection = cluster.client()
  const worker = createJobWorker({ kind: 'batch', prefix: PREFIX, connection: connection as unknown as Redis, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    const items = text.split('\n').filter(Boolean)
    for (let i = 0; i < items.length; i++) {
      await beforeItem(i)
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

interface Watchers { perJob: Client, jobs: Client, stream: SseClient }

/** A per-job socket, a `jobs` protocol subscription and an SSE stream on one job. */
async function watch (t: Teardown, host: string, up: { cookie?: string, body: any }): Promise<Watchers> {
  const jobId = String(up.body.job_id)
  const perJob = connect(t, `ws://${host}${String(up.body.ws_url)}`, { cookie: up.cookie })
  const jobs = connect(t, `ws://${host}${JOBS_PATH}`, { cookie: up.cookie })
  await jobs.waitFor(m => m.type === 'connected')
  jobs.send({ action: 'subscribe', job_id: jobId })
  const stream = await sse(t, `http://${host}/batch/${jobId}/events`, { cookie: up.cookie })
  return { perJob, jobs, stream }
}

async function allSee (w: Watchers, processed: number, timeoutMs = 20_000): Promise<void> {
  await Promise.all([
    w.perJob.waitFor(m => m.processed === processed, timeoutMs),
    w.jobs.waitFor(m => m.type === 'job_update' && m.processed === processed, timeoutMs),
    w.stream.waitFor(e => e.data?.processed === processed, timeoutMs)
  ])
}

async function allFinish (t: Teardown & { match: (a: unknown, b: unknown, m?: string) => void }, w: Watchers, total: number): Promise<void> {
  const [perJob, jobs, stream] = await Promise.all([
    w.perJob.waitFor(m => m.status === 'complete', 30_000),
    w.jobs.waitFor(m => m.type === 'job_update' && m.status === 'succeeded', 30_000),
    w.stream.waitFor(e => e.data?.status === 'succeeded', 30_000)
  ])
  t.match(perJob, { processed: total }, 'the per-job socket ends complete')
  t.match(jobs, { processed: total, result: { lines: total } }, 'the jobs protocol ends succeeded')
  t.match(stream.data, { processed: total, result: { lines: total } }, 'the SSE stream ends succeeded')
}

t.test('resharding mid-job', async (t) => {
  const cluster = await RedisCluster.start(t)

  t.test('the slot of a watched job\'s channel moves to another master: every watcher ends complete, the instance notices and re-reads', async (t) => {
    const uploadDir = await tempDir(t)
    const telemetry = recorder()
    // A watches (no bridge); B only relays the queue's events.
    const a = await instance(t, cluster, uploadDir, { telemetry, bridge: { enabled: false } })
    const b = await instance(t, cluster, uploadDir, { bridge: { claimIdleMs: 1000, claimIntervalMs: 500 } })
    const hold = gate()
    const rest = gate()
    workerOn(t, cluster, uploadDir, async (i) => {
      if (i === 1) await hold.promise
      if (i > 1) await new Promise(resolve => setTimeout(resolve, 10))
      if (i === 6) await rest.promise
    })
    const up = await upload(`${b.url}/batch/upload`, lines(12))
    t.equal(up.status, 202)
    const w = await watch(t, a.host, up)
    await allSee(w, 1)

    const channel = `jp:batch:{${String(up.body.job_id)}}`
    const slot = slotOf(channel)
    const from = await cluster.masterOfSlot(slot)
    const to = (await cluster.masters()).find(port => port !== from) as number
    const before = telemetry.counts.get('faults{"cause":"reconnect"}') ?? 0
    // Items 2 to 6 run while the slot changes hands: their events race the old owner's
    // `sunsubscribe` and the re-subscription on the new one. The rest runs after the move.
    await cluster.migrateSlot(slot, to, { beforeHandOver: async () => { hold.open() } })
    rest.open()
    await allFinish(t, w, 12)
    const node = cluster.node(to)
    t.teardown(() => node.disconnect())
    t.equal(await cluster.masterOfSlot(slot), to, 'the slot is on the new master')
    t.ok((telemetry.counts.get('faults{"cause":"reconnect"}') ?? 0) > before, 'the watching instance noticed the move and re-read its jobs')
  })

  t.test('the queue\'s slot moves to another master with its keys: the worker goes on, the bridge follows, every watcher ends complete', async (t) => {
    const uploadDir = await tempDir(t)
    const a = await instance(t, cluster, uploadDir, { bridge: { enabled: false } })
    const b = await instance(t, cluster, uploadDir, { bridge: { claimIdleMs: 1000, claimIntervalMs: 500 } })
    const hold = gate()
    const rest = gate()
    workerOn(t, cluster, uploadDir, async (i) => {
      if (i === 1) await hold.promise
      if (i > 1) await new Promise(resolve => setTimeout(resolve, 10))
      if (i === 6) await rest.promise
    })
    const up = await upload(`${b.url}/batch/upload`, lines(12))
    t.equal(up.status, 202)
    const w = await watch(t, a.host, up)
    await allSee(w, 1)

    const slot = slotOf(PREFIX)
    const from = await cluster.masterOfSlot(slot)
    const to = (await cluster.masters()).find(port => port !== from) as number
    // The job's hash, lock, lists, the event stream and the bridge's group all move with the slot
    // while the worker reports: BullMQ's scripts and the bridge's reads get ASK/TRYAGAIN and MOVED.
    hold.open()
    await cluster.migrateSlot(slot, to)
    rest.open()
    await allFinish(t, w, 12)
    t.equal(await cluster.masterOfSlot(slot), to, 'the queue\'s slot is on the new master')
    const second = await upload(`${b.url}/batch/upload`, lines(3), { cookie: up.cookie })
    t.equal(second.status, 202, 'a new job is taken after the move')
    const w2 = await watch(t, a.host, second)
    await allFinish(t, w2, 3)
  })
})
