import t from 'tap'
import type { Redis } from 'ioredis'
import { setTimeout as sleep } from 'node:timers/promises'
import { Cluster } from './helpers/cluster'
import { connect, lines, upload, type Client } from './helpers/index'

// Horizontal scale with real processes: several API instances of the example, separate worker
// processes, one Redis, nginx running deploy/nginx.conf in front (round robin, no stickiness).

const isFinal = (m: any): boolean => typeof m === 'object' && m !== null && m.status !== 'processing'
const processedAtLeast = (n: number) => (m: any): boolean => typeof m?.processed === 'number' && m.processed >= n
const progressOf = (c: Client): number[] => c.messages.filter(m => typeof m?.processed === 'number').map(m => m.processed)

async function health (url: string): Promise<any> {
  const res = await fetch(`${url}/health`)
  return await res.json()
}

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

t.test('uploaded through instance A, watched through instance B: every step, the final message, 1000', async (t) => {
  const c = await Cluster.start(t)
  const [a, b] = c.apis
  t.not(a.id, b.id, 'two instances, two ids')
  const up = await upload(`${a.url}/batch/upload`, lines(40))
  t.equal(up.status, 202)
  const watcher = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  const final = await watcher.waitFor(isFinal)
  t.same(final, { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 40, total: 40, eta_seconds: 0 })
  t.equal((await watcher.closed).code, 1000)
  const steps = progressOf(watcher)
  t.same(steps, [...steps].sort((x, y) => x - y), 'never goes back')
  // The job runs ~1.2 s and the reconcile every 5 s: steps in between came through pub/sub.
  t.ok(new Set(steps.filter(p => p > 0 && p < 40)).size >= 3, `progress in between relayed to B: ${steps.join(',')}`)
  // The session cookie A issued is valid on B (shared SESSION_SECRET), and only for its owner.
  const stranger = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: (await upload(`${b.url}/batch/upload`, lines(1))).cookie })
  t.equal((await stranger.closed).code, 4003, 'another session is refused on B too')
  t.equal(stranger.messages.length, 0)
})

t.test('through nginx: round robin over both instances, Host kept for the Origin check, large uploads stream', async (t) => {
  const c = await Cluster.start(t, { nginx: true })
  const nginx = c.nginx!
  const ids = new Set<string>()
  for (let i = 0; i < 6; i++) ids.add((await health(nginx.url)).instance)
  t.same([...ids].sort(), c.apis.map(a => a.id).sort(), '/health through nginx is answered by both instances')

  // A browser-like client: uploads and sockets through nginx, Origin = the page's origin.
  const first = await upload(`${nginx.url}/batch/upload`, lines(30))
  t.equal(first.status, 202)
  t.equal(first.body.ws_url, `${nginx.ws}/ws/batch/${first.body.job_id}`, 'ws_url points at nginx (Host passed with its port)')
  const jobs = [first.body.job_id]
  for (let i = 0; i < 3; i++) {
    const up = await upload(`${nginx.url}/batch/upload`, lines(30), { cookie: first.cookie })
    t.equal(up.status, 202)
    jobs.push(up.body.job_id)
  }
  const origin = nginx.url
  const clients = jobs.map(id => connect(t, `${nginx.ws}/ws/batch/${id}`, { cookie: first.cookie, headers: { origin } }))
  await Promise.all(clients.map(async cl => await cl.waitFor(() => true)))
  const sockets = await Promise.all(c.apis.map(async a => (await health(a.url)).sockets))
  t.ok(sockets.every(n => n >= 1), `sockets on each instance: ${sockets.join(', ')}`)
  for (const cl of clients) {
    t.match(await cl.waitFor(isFinal), { status: 'complete', processed: 30, total: 30 })
    t.equal((await cl.closed).code, 1000)
  }

  const foreign = connect(t, `${nginx.ws}/ws/batch/${jobs[0]}`, { cookie: first.cookie, headers: { origin: 'http://evil.example' } })
  t.equal((await foreign.closed).code, 4003, 'a foreign Origin is still refused behind nginx')
  t.equal(foreign.messages.length, 0)

  // Over nginx's default 1 MiB body limit: 3 records of 800 kB.
  const big = await upload(`${nginx.url}/batch/upload`, Array.from({ length: 3 }, (_, i) => String(i).repeat(800_000)).join('\n') + '\n', { cookie: first.cookie })
  t.equal(big.status, 202, 'a 2.4 MB upload passes nginx')
  const watcher = connect(t, big.body.ws_url, { cookie: first.cookie })
  t.match(await watcher.waitFor(isFinal), { status: 'complete', processed: 3, total: 3 })
})

t.test('SIGKILL of an instance mid-job: watchers elsewhere carry on, its clients reconnect through nginx to the current state', async (t) => {
  const c = await Cluster.start(t, { nginx: true })
  const [a, b] = c.apis
  const nginx = c.nginx!
  const up = await upload(`${a.url}/batch/upload`, lines(80))
  t.equal(up.status, 202)
  const onB = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  const onA = connect(t, `${a.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await Promise.all([onA.waitFor(processedAtLeast(10)), onB.waitFor(processedAtLeast(10))])

  await a.proc.stop('SIGKILL')
  const dropped = await onA.closed
  t.equal(dropped.code, 1006, 'the socket on A died with A')
  const seenOnA = Math.max(...progressOf(onA))
  t.ok(seenOnA < 80, 'A died before the job ended')

  // The client reconnects through nginx, which skips the dead instance.
  const again = connect(t, `${nginx.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  const t0 = Date.now()
  const first = await again.waitFor(() => true)
  t.ok(Date.now() - t0 < 2_000, 'the current state arrives at once')
  t.ok(first.processed >= seenOnA, `it starts where A left off (${first.processed} >= ${seenOnA})`)

  const done = { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 80, total: 80, eta_seconds: 0 }
  t.same(await onB.waitFor(isFinal), done, 'the watcher on B gets the final message')
  t.same(await again.waitFor(isFinal), done, 'the reconnected client gets the final message')
  t.equal((await onB.closed).code, 1000)
  t.equal((await again.closed).code, 1000)
  const stepsOnB = progressOf(onB)
  t.same(stepsOnB, [...stepsOnB].sort((x, y) => x - y), 'B never went back')
  t.ok(stepsOnB.some(p => p > seenOnA && p < 80), `B kept relaying progress after A died: ${stepsOnB.join(',')}`)

  const later = await upload(`${nginx.url}/batch/upload`, lines(2), { cookie: up.cookie })
  t.equal(later.status, 202, 'new uploads through nginx go to the live instance')
})

t.test('SIGKILL of the worker mid-job: the stalled job is retried by another worker, and watchers see the restart', async (t) => {
  const c = await Cluster.start(t, { apis: 2, workers: 1, workerEnv: { STALLED_INTERVAL_MS: '1000', ITEM_DELAY_MS: '40' } })
  const [a, b] = c.apis
  const up = await upload(`${a.url}/batch/upload`, lines(50))
  const watcher = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await watcher.waitFor(processedAtLeast(10))
  await c.workers[0].stop('SIGKILL')
  const before = Math.max(...progressOf(watcher))
  const seen = watcher.messages.length
  await c.startWorker()

  // The stall is detected (lock expired), the job goes back to the queue as a new attempt and the
  // new worker starts it over: the bar restarts rather than freezing at `before`.
  const restarted = await watcher.waitFor(m => watcher.messages.indexOf(m) >= seen && m.processed < before)
  t.equal(restarted.status, 'processing')
  t.same(await watcher.waitFor(isFinal), { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 50, total: 50, eta_seconds: 0 })
  t.equal((await watcher.closed).code, 1000)
})

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
  const c = await Cluster.start(t, { nginx: true })
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
  const c = await Cluster.start(t)
  const [a, b] = c.apis
  const redis = c.redis.client()
  t.teardown(() => redis.disconnect())
  const channelsNow = async (): Promise<string[]> => (await redis.call('PUBSUB', 'CHANNELS', 'jp:*') as string[]).sort()
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
