import t from 'tap'
import { rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { browserPage, startNginx, until, watchJobs } from './helpers/browser'
import { Cluster, type Api } from './helpers/cluster'
import { eventually } from './helpers/index'

// The client in real Chromium against 2 API instances of the example, a worker and nginx running
// deploy/nginx.conf, with two test-only locations in front that refuse the WebSocket upgrade or
// the SSE stream while a flag file exists.

t.test('browser client through nginx, 2 instances, a worker', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, env: { ITEM_DELAY_MS: '20' } })
  const nginx = await startNginx(t, cluster.apis)
  const page = await browserPage(t, nginx.url)
  const sockets: string[] = []
  page.on('websocket', ws => sockets.push(ws.url()))
  const requests: string[] = []
  page.on('request', r => requests.push(r.url()))

  await t.test('50 jobs watched on one page: one connection, all final', async (t) => {
    await watchJobs(page, 'many', {}, 50, 3)
    const x = await until(page, 'many', x => x.results.length === 50, 60_000)
    t.ok(x.results.every(r => r.status === 'succeeded'), 'every job reached its final state')
    t.equal(x.connections, 1)
    t.equal(sockets.length, 1, 'one WebSocket for 50 jobs')
  })

  await t.test('the instance serving the connection is killed mid-job: the page goes on through the other', async (t) => {
    await watchJobs(page, 'kill', { backoff: { minMs: 200, maxMs: 1000 } }, 1, 150)
    await until(page, 'kill', x => x.state.state === 'live')
    let serving: Api | undefined
    await eventually(async () => {
      for (const api of cluster.apis) {
        const health = await (await fetch(`${api.url}/job-progress/health`)).json() as { sockets: number }
        if (health.sockets > 0) serving = api
      }
      return serving !== undefined
    })
    await serving?.proc.stop('SIGKILL')
    const x = await until(page, 'kill', x => x.results.length === 1, 30_000)
    t.match(x.results[0], { status: 'succeeded', processed: 150 }, 'final state through the other instance')
    t.ok(x.states.some(s => s.state === 'reconnecting'), 'it said it was reconnecting')
    t.ok(x.connections >= 2)
    cluster.apis.splice(cluster.apis.indexOf(serving as Api), 1)
    // Back to two instances for what follows, on the port nginx knows.
    await cluster.startApi((serving as Api).port)
  })

  await t.test('upgrade refused → SSE; SSE refused too → polling; both allowed again → back to WebSocket', async (t) => {
    await writeFile(join(nginx.flags, 'block-ws'), '')
    const fast = { backoff: { minMs: 100, maxMs: 500 }, upgradeIntervalMs: 1500, pollIntervalMs: 300 }
    await watchJobs(page, 'sse', fast, 1, 400)
    await until(page, 'sse', x => x.state.state === 'fallback' && x.state.transport === 'sse')
    await writeFile(join(nginx.flags, 'block-sse'), '')
    await watchJobs(page, 'poll', fast, 1, 400)
    await until(page, 'poll', x => x.state.state === 'fallback' && x.state.transport === 'polling')
    t.pass('fell back to SSE, then to polling')
    await rm(join(nginx.flags, 'block-ws'))
    await rm(join(nginx.flags, 'block-sse'))
    const a = await until(page, 'sse', x => x.state.transport === 'websocket' && x.state.state === 'live', 15_000)
    const b = await until(page, 'poll', x => x.state.transport === 'websocket' && x.state.state === 'live', 15_000)
    t.ok(a && b, 'both moved back up to WebSocket')
    const done = await until(page, 'poll', x => x.results.length === 1, 60_000)
    t.match(done.results[0], { status: 'succeeded', processed: 400 })
  })

  await t.test('wrong credentials: a typed error on the page, no retry loop', async (t) => {
    // A fresh browser profile: no session cookie to fall back on.
    const other = await page.context().browser()?.newContext()
    t.teardown(async () => await other?.close())
    const fresh = await (other as NonNullable<typeof other>).newPage()
    await fresh.goto(`${nginx.url}/`)
    await fresh.addScriptTag({ type: 'module', content: "import * as client from '/job-progress/client.js'; window.JP = client" })
    await fresh.waitForFunction(() => (window as any).JP !== undefined)
    let attempts = 0
    fresh.on('websocket', () => attempts++)
    fresh.on('request', () => attempts++)
    const error = await fresh.evaluate(async () => {
      const { JobProgressClient } = (window as any).JP
      const c = new JobProgressClient({ wsPath: '/api/v1/ws/jobs', apiKey: 'not-a-key', backoff: { minMs: 50, maxMs: 100 } })
      const w = c.watch('batch', '00000000-0000-4000-8000-000000000000')
      return await w.done.then(() => 'resolved', (e: any) => `${e.name}: ${e.message}`)
    })
    t.match(error, /^AuthError: /)
    await sleep(1500)
    t.equal(attempts, 1, 'one WebSocket attempt, nothing after it')
  })
})
