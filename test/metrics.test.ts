import t from 'tap'
import { writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Registry } from 'prom-client'
import Fastify from 'fastify'
import { jobProgress } from '../lib/index'
import { connect, eventually, freePort, lines, redisFor, startApp, startWorker, tempDir, upload } from './helpers/index'
import { spawnTracked } from './helpers/tracked'

// The opt-in metrics, scraped by a real Prometheus server started here and asked through its
// HTTP API, as an operator's dashboards would.

async function query (base: string, expr: string): Promise<Array<{ metric: Record<string, string>, value: [number, string] }>> {
  const res = await fetch(`${base}/api/v1/query?query=${encodeURIComponent(expr)}`)
  const body = await res.json() as { status: string, data: { result: Array<{ metric: Record<string, string>, value: [number, string] }> } }
  if (body.status !== 'success') throw new Error(`query ${expr} failed: ${JSON.stringify(body)}`)
  return body.data.result
}

t.test('Prometheus scrapes /job-progress/metrics: sockets, watched jobs, relayed events, latency, snapshot reads, uploads', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const { url, ws, app } = await startApp(t, redis, { uploadDir, metrics: true })
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 20 })

  const up = await upload(`${url}/batch/upload`, lines(5))
  t.equal(up.status, 202)
  const client = connect(t, `${ws}/ws/batch/${up.body.job_id}`, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'complete')
  const refused = await fetch(`${url}/batch/upload`, { method: 'POST', body: 'x', headers: { 'content-type': 'text/plain' } })
  t.equal(refused.status, 415)
  // One socket stays open, watching a job that waits for ever (no worker for `dataset`).
  const waiting = await upload(`${url}/dataset/upload`, lines(1), { cookie: up.cookie })
  const watcher = connect(t, `${ws}/ws/dataset/${waiting.body.job_id}`, { cookie: up.cookie })
  await watcher.waitFor(m => m.status === 'processing')

  const text = await (await fetch(`${url}/job-progress/metrics`)).text()
  t.match(text, /job_progress_events_relayed_total \d+/)

  const dir = await tempDir(t, 'jp-prom-')
  const port = await freePort()
  const target = new URL(url).host
  await writeFile(join(dir, 'prometheus.yml'), `global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: app\n    scrape_interval: 1s\n    metrics_path: /job-progress/metrics\n    static_configs:\n      - targets: ['${target}']\n`)
  const prom = spawnTracked('prometheus', [`--config.file=${join(dir, 'prometheus.yml')}`, `--storage.tsdb.path=${join(dir, 'data')}`, `--web.listen-address=127.0.0.1:${port}`], { stdio: 'ignore' })
  t.teardown(async () => {
    if (prom.exitCode !== null) return
    const exited = new Promise(resolve => prom.once('exit', resolve))
    prom.kill('SIGTERM')
    await exited
  })
  const base = `http://127.0.0.1:${port}`
  t.ok(await eventually(async () => {
    try {
      return (await query(base, 'up{job="app"}')).some(r => r.value[1] === '1')
    } catch {
      return false
    }
  }, 30_000, 250), 'Prometheus scraped the app')

  const one = async (expr: string): Promise<number> => {
    const rows = await query(base, expr)
    return rows.reduce((n, r) => n + Number(r.value[1]), 0)
  }
  t.equal(await one('job_progress_sockets_open{protocol="progress"}'), 1, 'one open socket on the progress protocol')
  t.equal(await one('job_progress_watched_jobs'), 1, 'one watched job')
  t.ok(await one('job_progress_events_relayed_total') >= 2, 'events relayed')
  t.ok(await one('job_progress_relay_latency_seconds_count') >= 1, 'relay latency observed')
  t.ok(await one('job_progress_snapshot_reads_total{reason="open"}') >= 2, 'snapshot reads on open')
  t.equal(await one('job_progress_uploads_total{outcome="accepted"}'), 2)
  t.equal(await one('job_progress_uploads_total{outcome="refused",reason="415"}'), 1)
  t.ok(await one('job_progress_bridge_published_total') >= 5, 'the bridge published')
  t.ok((await query(base, 'job_progress_bridge_lag')).length >= 1, 'bridge lag per queue')
  await app.close()
})

t.test('metrics are off by default; a user registry and a path of ones own; bad options are refused', async (t) => {
  const redis = await redisFor(t)
  const off = await startApp(t, redis)
  t.equal((await fetch(`${off.url}/job-progress/metrics`)).status, 404, 'no route unless asked for')

  const registry = new Registry()
  const own = await startApp(t, redis, { metrics: { registry, path: '/ops/metrics' } })
  t.equal((await fetch(`${own.url}/ops/metrics`)).status, 200)
  t.match(await registry.metrics(), /job_progress_watched_jobs/, 'registered in the user\'s registry')

  const bad = Fastify({ logger: false })
  t.teardown(async () => await bad.close())
  await t.rejects(async () => {
    await bad.register(jobProgress, { connection: redis.url, kinds: { a: {} }, metrics: { path: 'metrics' } })
    await bad.ready()
  }, /metrics.path/)
})
