import t from 'tap'
import { chromium, type Page } from 'playwright-core'
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Cluster, NGINX_CONF, Proc, renderNginxConf, type Api } from './helpers/cluster'
import { eventually, freePort, tempDir } from './helpers/index'

// The client in real Chromium against 2 API instances of the example, a worker and nginx running
// deploy/nginx.conf, with two test-only locations in front that refuse the WebSocket upgrade or
// the SSE stream while a flag file exists.

interface Teardown { teardown: (fn: () => unknown) => void }

/** nginx with deploy/nginx.conf, plus `/api/v1/ws/` and `/events` locations that answer 403 while `block-ws` / `block-sse` exist. */
async function startNginx (t: Teardown, apis: Api[]): Promise<{ url: string, flags: string }> {
  const prefix = await tempDir(t, 'jp-nginx-')
  const port = await freePort()
  let conf = renderNginxConf(await readFile(NGINX_CONF, 'utf8'), { servers: apis.map(a => `127.0.0.1:${a.port}`), port, prefix })
  const body = /location \/ \{\n([\s\S]*?)\n {8}\}/.exec(conf)?.[1]
  if (body === undefined) throw new Error('deploy/nginx.conf: `location / {` not found')
  const blocking = (path: string, flag: string): string => `location ${path} {\n            if (-f ${join(prefix, flag)}) { return 403; }\n${body}\n        }\n\n        `
  conf = conf.replace('location / {', blocking('/api/v1/ws/', 'block-ws') + blocking('/events', 'block-sse') + 'location / {')
  await mkdir(join(prefix, 'temp'), { recursive: true })
  const file = join(prefix, 'nginx.conf')
  await writeFile(file, conf)
  const proc = new Proc('nginx', '/usr/sbin/nginx', ['-p', prefix, '-c', file, '-g', `daemon off; user root; pid ${join(prefix, 'nginx.pid')}; error_log stderr;`], { PATH: process.env.PATH })
  t.teardown(async () => await proc.stop('SIGTERM'))
  const url = `http://127.0.0.1:${port}`
  if (!await eventually(async () => (await fetch(`${url}/health`).catch(() => null))?.status === 200, 10_000)) throw new Error(`nginx did not start:\n${proc.output}`)
  return { url, flags: prefix }
}

async function browserPage (t: Teardown, url: string): Promise<Page> {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] })
  t.teardown(async () => await browser.close())
  const page = await browser.newPage()
  await page.goto(`${url}/`)
  // The module the plugin serves, as a page without a bundler imports it.
  await page.addScriptTag({ type: 'module', content: "import * as client from '/job-progress/client.js'; window.JP = client" })
  await page.waitForFunction(() => (window as any).JP !== undefined)
  return page
}

/** Makes `window.c` a client with `opts`, recording its states; uploads `n` jobs of `lines` records and watches them. */
async function watchJobs (page: Page, name: string, opts: Record<string, unknown>, n: number, lines: number): Promise<void> {
  await page.evaluate(async ({ name, opts, n, lines }) => {
    const { JobProgressClient } = (window as any).JP
    const w = window as any
    const c = new JobProgressClient({ wsPath: '/api/v1/ws/jobs', ...opts })
    const states: any[] = []
    c.onState((s: any) => states.push({ state: s.state, transport: s.transport, retryInMs: s.retryInMs, at: Date.now(), error: s.error?.name }))
    const results: any[] = []
    const jobs = []
    for (let i = 0; i < n; i++) jobs.push(c.upload('batch', new Blob([Array.from({ length: lines }, (_, j) => `r${j}`).join('\n')]), { filename: `${name}-${i}.txt` }))
    const uploaded = await Promise.all(jobs)
    for (const job of uploaded) {
      job.watch().done.then((u: any) => results.push({ status: u.status, processed: u.processed, result: u.result }), (e: any) => results.push({ error: e.name, message: e.message }))
    }
    w[name] = { c, states, results, ids: uploaded.map((j: any) => j.jobId) }
  }, { name, opts, n, lines })
}

const get = async (page: Page, name: string): Promise<{ states: any[], results: any[], ids: string[], connections: number, state: any }> =>
  await page.evaluate((name) => { const x = (window as any)[name]; return { states: x.states, results: x.results, ids: x.ids, connections: x.c.connections, state: x.c.state } }, name)

async function until (page: Page, name: string, test: (x: Awaited<ReturnType<typeof get>>) => boolean, timeoutMs = 30_000): Promise<Awaited<ReturnType<typeof get>>> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const x = await get(page, name)
    if (test(x)) return x
    if (Date.now() > deadline) throw new Error(`${name}: condition not met within ${timeoutMs} ms: ${JSON.stringify({ ...x, states: x.states.slice(-8) })}`)
    await sleep(100)
  }
}

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
        const health = await (await fetch(`${api.url}/health`)).json() as { sockets: number }
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

  await t.test('every instance down for 20 s: attempts spaced by the backoff, then recovery', async (t) => {
    // The default first wait (1 s) and a lower cap than the default 30 s, so recovery is seen soon.
    await watchJobs(page, 'down', { transports: ['websocket'], backoff: { minMs: 1000, maxMs: 8000 } }, 1, 600)
    await until(page, 'down', x => x.state.state === 'live')
    const ports = cluster.apis.map(a => a.port)
    await Promise.all(cluster.apis.map(async a => await a.proc.stop('SIGKILL')))
    cluster.apis.length = 0
    const downAt = Date.now()
    await sleep(20_000)
    await Promise.all(ports.map(async p => await cluster.startApi(p)))
    const x = await until(page, 'down', x => x.results.length === 1, 60_000)
    t.match(x.results[0], { status: 'succeeded', processed: 600 }, 'final state after recovery')
    const waits = x.states.filter(s => s.state === 'reconnecting' && s.at >= downAt - 1000 && s.at <= downAt + 20_000)
    t.ok(waits.length >= 3 && waits.length <= 10, `${waits.length} attempts in 20 s (not a loop, not given up)`)
    waits.forEach((s, i) => t.ok(s.retryInMs <= Math.min(8000, 1000 * 2 ** i), `wait ${i}: ${s.retryInMs} ms ≤ ${Math.min(8000, 1000 * 2 ** i)} ms`))
    for (let i = 1; i < waits.length; i++) {
      t.ok(waits[i].at - waits[i - 1].at >= waits[i - 1].retryInMs - 50, `attempt ${i} came after the wait announced before it`)
    }
  })
})
