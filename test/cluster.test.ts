import t from 'tap'
import type { Redis } from 'ioredis'
import { setTimeout as sleep } from 'node:timers/promises'
import { Cluster, sharedCluster } from './helpers/cluster'
import { connect, lines, upload } from './helpers/index'
import { health, isFinal, multiInstanceCases, processedAtLeast, progressOf } from './helpers/multi-instance'

// Horizontal scale with real processes: several API instances of the example, separate worker
// processes, one Redis, nginx running deploy/nginx.conf in front (round robin, no stickiness).

/** Redis's own count of subscribers of each channel, through a connection of the test's own. */
async function numsub (redis: Redis, ...channels: string[]): Promise<number[]> {
  const reply = await redis.call('PUBSUB', 'NUMSUB', ...channels) as Array<string | number>
  return channels.map((_, i) => Number(reply[i * 2 + 1]))
}

/** Polls Redis until `check` holds: pub/sub changes land a round trip after the socket event. */
async function until (what: string, check: () => Promise<boolean>, timeoutMs = 3_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`)
    await sleep(20)
  }
}

// The cases that kill nothing and need no settings of their own share one set of processes.
const shared = sharedCluster(t, { nginx: true })

// The cases every topology passes (A to B, nginx, an instance killed, the worker killed).
multiInstanceCases(t, async (t, opts) => await Cluster.start(t, opts), shared)

t.test('a job whose workers die twice fails (maxStalledCount 1) and watchers get the failure', async (t) => {
  const c = await Cluster.start(t, { apis: 1, workers: 1, workerEnv: { STALLED_INTERVAL_MS: '1000', ITEM_DELAY_MS: '40' } })
  const [a] = c.apis
  const up = await upload(`${a.url}/batch/upload`, lines(50))
  const watcher = connect(t, `${a.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await watcher.waitFor(processedAtLeast(10))
  await c.workers[0].stop('SIGKILL')
  const before = Math.max(...progressOf(watcher))
  const seen = watcher.messages.length
  const second = await c.startWorker()
  // The second attempt runs (progress from the start again), then its worker dies too.
  await watcher.waitFor(m => watcher.messages.indexOf(m) >= seen && m.processed > 0 && m.processed < before)
  await second.stop('SIGKILL')
  await c.startWorker()
  const final = await watcher.waitFor(isFinal)
  t.match(final, { job_id: up.body.job_id, status: 'failed', error: /stalled/ })
  t.equal((await watcher.closed).code, 1000)
  const status = await fetch(`${a.url}/batch/${up.body.job_id}/status`, { headers: { cookie: up.cookie as string } })
  t.match(await status.json(), { status: 'failed' }, 'the status route agrees')
})

t.test('Redis restarts mid-job: every watcher, on every instance, converges to the final state', async (t) => {
  const c = await shared()
  const [a, b] = c.apis
  const up = await upload(`${a.url}/batch/upload`, lines(80))
  const watchers = [
    connect(t, `${a.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie }),
    connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie }),
    connect(t, `${c.nginx!.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  ]
  await Promise.all(watchers.map(async w => await w.waitFor(processedAtLeast(10))))
  await c.redis.restart()
  const done = { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 80, total: 80, eta_seconds: 0 }
  for (const [i, w] of watchers.entries()) {
    t.same(await w.waitFor(isFinal), done, `watcher ${i} converged`)
    t.equal((await w.closed).code, 1000)
    const steps = progressOf(w)
    t.same(steps, [...steps].sort((x, y) => x - y), `watcher ${i} never went back`)
  }
  // The restarted Redis kept the job (append-only file) and both instances are healthy again.
  await until('both instances report Redis up', async () => (await Promise.all(c.apis.map(async x => (await health(x.url)).redis))).every(r => r === 'up'))
  const later = await upload(`${b.url}/batch/upload`, lines(3), { cookie: up.cookie })
  t.equal(later.status, 202)
  const after = connect(t, later.body.ws_url, { cookie: up.cookie })
  t.match(await after.waitFor(isFinal), { status: 'complete', processed: 3 }, 'relaying works after the restart')
})

t.test("Redis's view: a job's channel has subscribers only while watched, one per watching instance", async (t) => {
  const c = await shared()
  const [a, b] = c.apis
  const redis = c.redis.client()
  t.teardown(() => redis.disconnect())
  const channelsNow = async (): Promise<string[]> => (await redis.call('PUBSUB', 'CHANNELS', 'jp:*') as string[]).sort()
  // The earlier cases' sockets are closed: their instances drop the channels a round trip later.
  await until('no job channel is left from the earlier cases', async () => (await channelsNow()).length === 0)
  t.same(await channelsNow(), [], 'no job channel while nothing is watched')

  const up = await upload(`${a.url}/batch/upload`, lines(100))
  const channel = `jp:batch:{${up.body.job_id}}`
  const first = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await first.waitFor(() => true)
  t.same(await numsub(redis, channel), [1], 'watched on B: one subscriber')
  t.same(await channelsNow(), [channel])
  t.equal((await health(a.url)).watchedJobs, 0, 'A, which took the upload but has no watcher, watches nothing')

  const clients = (await redis.call('CLIENT', 'LIST') as string).trim().split('\n')
  const field = (line: string, name: string): number => Number(new RegExp(`\\b${name}=(\\d+)`).exec(line)?.[1] ?? 0)
  t.equal(clients.reduce((n, l) => n + field(l, 'sub'), 0), 1, 'one channel subscription in all of Redis: A holds none')
  t.equal(clients.reduce((n, l) => n + field(l, 'psub'), 0), 0, 'no pattern subscription anywhere (nobody receives every job)')

  const second = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await second.waitFor(() => true)
  t.same(await numsub(redis, channel), [1], 'a second socket on B shares its subscription')
  const onA = connect(t, `${a.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await onA.waitFor(() => true)
  t.same(await numsub(redis, channel), [2], 'a socket on A: A subscribes too')

  onA.close()
  await until('A unsubscribed', async () => (await numsub(redis, channel))[0] === 1)
  first.close()
  await sleep(100)
  t.same(await numsub(redis, channel), [1], 'B keeps its subscription while one of its sockets still watches')
  second.close()
  await until('B unsubscribed', async () => (await numsub(redis, channel))[0] === 0)
  t.same(await channelsNow(), [], 'no channel left once the sockets closed, though the job still runs')
  const running = await fetch(`${a.url}/batch/${up.body.job_id}/status`, { headers: { cookie: up.cookie as string } })
  t.match(await running.json(), { status: 'processing' })

  // A socket that ends with the job (1000 after the final message) also leaves no subscription.
  const last = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await last.waitFor(isFinal)
  t.equal((await last.closed).code, 1000)
  await until('the channel is gone after the final message', async () => (await channelsNow()).length === 0)
  t.same(await Promise.all(c.apis.map(async x => (await health(x.url)).watchedJobs)), [0, 0])
})
