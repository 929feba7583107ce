import t from 'tap'
import { once } from 'node:events'
import { readdir, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { connect, eventually, gate, lines, redisFor, startApp, startWorker, tempDir, upload } from './helpers/index'
import type { RedisServer } from './helpers/redis'

// Convergence is paid per event and per fault: nothing re-reads watched jobs on a timer (the
// safety sweep is off in these tests), and each fault that can lose an event is detected and
// repaired by re-reading what it could have touched.

const NO_SWEEP = { sweepReadsPerSecond: 0 }

async function commandCalls (redis: RedisServer): Promise<Record<string, number>> {
  const client = redis.client()
  try {
    const info = await client.info('commandstats')
    const out: Record<string, number> = {}
    for (const m of info.matchAll(/cmdstat_([\w|]+):calls=(\d+)/g)) out[m[1]] = Number(m[2])
    return out
  } finally {
    client.disconnect()
  }
}

t.test('idle watched jobs cost no Redis reads: 40 active jobs, each watched, nothing reporting', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  // The per-instance periodic work (the bridge's claim and gap check, the instance heartbeat) is
  // pushed past the window: it runs per queue and per instance, not per watched job, and in the
  // 3 s window below it would be counted or not depending on where its timer falls.
  const { url, ws } = await startApp(t, redis, { uploadDir, ...NO_SWEEP, instanceHeartbeatMs: 60_000, bridge: { claimIntervalMs: 60_000 } })
  const hold = gate()
  let started = 0
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async () => { started++; await hold.promise } }, { workerOptions: { concurrency: 40 } })
  t.teardown(() => hold.open())
  const clients = []
  let cookie: string | undefined
  for (let i = 0; i < 40; i++) {
    const up = await upload(`${url}/batch/upload`, lines(2), { cookie })
    cookie = up.cookie
    clients.push(connect(t, `${ws}/ws/batch/${up.body.job_id}`, { cookie }))
  }
  t.ok(await eventually(() => started === 40, 10_000), 'all 40 jobs active')
  await Promise.all(clients.map(async c => await c.waitFor(m => m.status === 'processing')))
  const before = await commandCalls(redis)
  await new Promise(resolve => setTimeout(resolve, 3_000))
  const after = await commandCalls(redis)
  const delta = (name: string): number => (after[name] ?? 0) - (before[name] ?? 0)
  // The bridge's relay script runs after each of its wake-ups, which time out every 2 s when idle
  // (2, or 3 when a loaded machine delays one); a snapshot read per watched job would be 40 or more.
  t.ok(delta('evalsha') + delta('eval') <= 3, `no snapshot read of an idle job: ${delta('evalsha') + delta('eval')} scripts, the bridge's`)
  t.equal(delta('lpos'), 0, 'no LPOS')
  t.equal(delta('hmget'), 0, 'no job hash read')
  const total = Object.keys(after).reduce((n, k) => n + delta(k), 0)
  // The workers' lock renewals and the bridge's blocking reads run whatever is watched; 40
  // watched jobs under the old 500 ms reconcile cost ~1,200 commands here.
  t.ok(total < 200, `commands in 3 s with 40 idle watched jobs: ${total}`)
  hold.open()
  await Promise.all(clients.map(async c => await c.waitFor(m => m.status === 'complete')))
})

t.test('a subscriber reconnect loses what was published meanwhile: the re-read after it repairs it', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  // The watcher has no bridge of its own, so every event reaches it through its subscriber.
  const watcher = await startApp(t, redis, { uploadDir, ...NO_SWEEP, bridge: { enabled: false } })
  await startApp(t, redis, { uploadDir, ...NO_SWEEP })
  const hold = gate()
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 1) await hold.promise } })
  const up = await upload(`${watcher.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.processed === 1)

  // Cut the watcher's subscriber and let the job finish while it is away.
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  const list = await admin.client('LIST') as string
  const subs = list.split('\n').filter(l => /\bsub=[1-9]/.test(l)).map(l => /\bid=(\d+)/.exec(l)?.[1] as string)
  t.equal(subs.length, 1, 'one subscriber connection holds the job\'s channel')
  // ioredis reconnects after 50 ms; the job's last steps and its end take less.
  await admin.call('CLIENT', 'KILL', 'ID', subs[0])
  hold.open()
  const final = await client.waitFor(m => m.status === 'complete', 10_000)
  t.equal(final.processed, 3)
})

t.test('the event stream trimmed past the bridge: the queue\'s watchers are told to re-read', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const watcher = await startApp(t, redis, { uploadDir, ...NO_SWEEP, bridge: { enabled: false } })
  const bridge = await startApp(t, redis, { uploadDir, ...NO_SWEEP })
  const hold = gate()
  const worker = startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 1) await hold.promise } })
  const up = await upload(`${watcher.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.processed === 1)

  // The only bridge goes away; the job ends; BullMQ's trim drops the events nobody read.
  await bridge.app.close()
  hold.open()
  await once(worker, 'completed')
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  await admin.xtrim('bull:batch:events', 'MAXLEN', 0)
  t.notOk(client.messages.some(m => m.status === 'complete'), 'nothing relayed the end')

  await startApp(t, redis, { uploadDir, ...NO_SWEEP, bridge: { claimIntervalMs: 100 } })
  const final = await client.waitFor(m => m.status === 'complete', 10_000)
  t.equal(final.processed, 3)
})

t.test('Redis restarted empty: watchers get failed with job_lost, not cancelled', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const { url } = await startApp(t, redis, { uploadDir, ...NO_SWEEP })
  const hold = gate()
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 1) await hold.promise } })
  t.teardown(() => hold.open())
  const up = await upload(`${url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.processed === 1)

  await redis.down()
  for (const entry of await readdir(redis.dir)) await rm(join(redis.dir, entry), { recursive: true, force: true })
  await redis.up()
  const final = await client.waitFor(m => m.status !== 'processing', 15_000)
  t.same(final, { ...final, status: 'failed', error: 'job_lost' })
  t.equal((await client.closed).code, 1000)
})
