import { chromium, type Browser, type Page } from 'playwright-core'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { NGINX_CONF, Proc, renderNginxConf, type Api } from './cluster'
import { eventually, freePort, tempDir } from './index'
import { adoptProcess, childPids } from './tracked'

interface Teardown { teardown: (fn: () => unknown) => void }

/**
 * nginx with deploy/nginx.conf, plus `/api/v1/ws/` and `/job-progress/events` locations that answer
 * 403 while `block-ws` / `block-sse` exist. `/job-progress/events` requests are logged to `sseLog`, one line each when it
 * ends: time, status, the instance(s) tried, the quoted Last-Event-ID header, the URI.
 */
export async function startNginx (t: Teardown, apis: Api[]): Promise<{ url: string, flags: string, sseLog: string }> {
  const prefix = await tempDir(t, 'jp-nginx-')
  const port = await freePort()
  let conf = renderNginxConf(await readFile(NGINX_CONF, 'utf8'), { servers: apis.map(a => `127.0.0.1:${a.port}`), port, prefix })
  const body = /location \/ \{\n([\s\S]*?)\n {8}\}/.exec(conf)?.[1]
  if (body === undefined) throw new Error('deploy/nginx.conf: `location / {` not found')
  const blocking = (path: string, flag: string, extra = ''): string => `location ${path} {\n${extra}            if (-f ${join(prefix, flag)}) { return 403; }\n${body}\n        }\n\n        `
  const sseLog = join(prefix, 'sse.log')
  conf = conf.replace('location / {', blocking('/api/v1/ws/', 'block-ws') + blocking('/job-progress/events', 'block-sse', `            access_log ${sseLog} sse;\n`) + 'location / {')
  conf = conf.replace(/^http \{\n/m, 'http {\n    log_format sse \'$msec $status $upstream_addr "$http_last_event_id" $request_uri\';\n')
  await mkdir(join(prefix, 'temp'), { recursive: true })
  const file = join(prefix, 'nginx.conf')
  await writeFile(file, conf)
  const proc = new Proc('nginx', '/usr/sbin/nginx', ['-p', prefix, '-c', file, '-g', `daemon off; user root; pid ${join(prefix, 'nginx.pid')}; error_log stderr;`], { PATH: process.env.PATH })
  t.teardown(async () => await proc.stop('SIGTERM'))
  const url = `http://127.0.0.1:${port}`
  if (!await eventually(async () => (await fetch(`${url}/job-progress/health`).catch(() => null))?.status === 200, 10_000)) throw new Error(`nginx did not start:\n${proc.output}`)
  return { url, flags: prefix, sseLog }
}

/**
 * Debian's Chromium through playwright-core, closed at teardown. Its process is recorded like any
 * other a test starts, so a test process killed outright leaves no browser behind (the run's
 * leak check finds and stops it).
 */
export async function launchChromium (t: Teardown): Promise<Browser> {
  const before = childPids()
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] })
  const releases = [...childPids()].filter(pid => !before.has(pid)).map(pid => adoptProcess(pid, 'chromium (playwright-core)'))
  t.teardown(async () => {
    await browser.close()
    for (const release of releases) release()
  })
  return browser
}

export async function browserPage (t: Teardown, url: string): Promise<Page> {
  const browser = await launchChromium(t)
  const page = await browser.newPage()
  await page.goto(`${url}/`)
  // The module the plugin serves, as a page without a bundler imports it.
  await page.addScriptTag({ type: 'module', content: "import * as client from '/job-progress/client.js'; window.JP = client" })
  await page.waitForFunction(() => (window as any).JP !== undefined)
  return page
}

/** Makes `window.c` a client with `opts`, recording its states; uploads `n` jobs of `lines` records and watches them. */
export async function watchJobs (page: Page, name: string, opts: Record<string, unknown>, n: number, lines: number): Promise<void> {
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

export const get = async (page: Page, name: string): Promise<{ states: any[], results: any[], ids: string[], connections: number, state: any }> =>
  await page.evaluate((name) => { const x = (window as any)[name]; return { states: x.states, results: x.results, ids: x.ids, connections: x.c.connections, state: x.c.state } }, name)

export async function until (page: Page, name: string, test: (x: Awaited<ReturnType<typeof get>>) => boolean, timeoutMs = 30_000): Promise<Awaited<ReturnType<typeof get>>> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const x = await get(page, name)
    if (test(x)) return x
    if (Date.now() > deadline) throw new Error(`${name}: condition not met within ${timeoutMs} ms: ${JSON.stringify({ ...x, states: x.states.slice(-8) })}`)
    await sleep(100)
  }
}
