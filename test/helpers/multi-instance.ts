import type { Test } from 'tap'
import type { Cluster, ClusterOptions } from './cluster'
import { connect, lines, upload, type Client } from './index'

// The multi-instance cases every Redis topology must pass (2 API instances of the example, a
// worker process, nginx in front): run on a private redis-server by test/cluster.test.ts and on a
// real Redis Cluster by test/cluster-on-redis-cluster.test.ts.

export const isFinal = (m: any): boolean => typeof m === 'object' && m !== null && m.status !== 'processing'
export const processedAtLeast = (n: number) => (m: any): boolean => typeof m?.processed === 'number' && m.processed >= n
export const progressOf = (c: Client): number[] => c.messages.filter(m => typeof m?.processed === 'number').map(m => m.processed)

export async function health (url: string): Promise<any> {
  const res = await fetch(`${url}/job-progress/health`)
  return await res.json()
}

/**
 * Registers the cases on `t`; `start` makes the processes on the topology under test, and `shared`
 * gives the file's set of processes with nginx (2 API instances, a worker), which the cases that
 * kill nothing and need no settings of their own use in turn.
 */
export function multiInstanceCases (t: Test, start: (t: Test, opts?: ClusterOptions) => Promise<Cluster>, shared: () => Promise<Cluster>): void {
  t.test('uploaded through instance A, watched through instance B: every step, the final message, 1000', async (t) => {
    const c = await shared()
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
    const c = await shared()
    const nginx = c.nginx!
    const ids = new Set<string>()
    for (let i = 0; i < 6; i++) ids.add((await health(nginx.url)).instance)
    t.same([...ids].sort(), c.apis.map(a => a.id).sort(), 'liveness through nginx is answered by both instances')

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
    const c = await start(t, { nginx: true })
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
    const c = await start(t, { apis: 2, workers: 1, workerEnv: { STALLED_INTERVAL_MS: '1000', ITEM_DELAY_MS: '40' } })
    const [a, b] = c.apis
    const up = await upload(`${a.url}/batch/upload`, lines(50))
    const watcher = connect(t, `${b.ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
    await watcher.waitFor(processedAtLeast(10))
    await c.workers[0].stop('SIGKILL')
    const before = Math.max(...progressOf(watcher))
    const seen = watcher.messages.length
    await c.startWorker()

    // The stall is detected (lock expired), the job goes back to the queue as a new attempt and the
    // new worker starts it over: the bar restarts rather than freezing at `before`. On a Redis
    // Cluster on a loaded machine this was seen to take over 15 s, hence the longer wait.
    const restarted = await watcher.waitFor(m => watcher.messages.indexOf(m) >= seen && m.processed < before, 45_000)
    t.equal(restarted.status, 'processing')
    t.same(await watcher.waitFor(isFinal), { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 50, total: 50, eta_seconds: 0 })
    t.equal((await watcher.closed).code, 1000)
  })
}
