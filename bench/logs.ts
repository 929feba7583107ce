/**
 * Live logs and the owner feed.
 *
 * 1. Log lines per second one job can stream to W watchers (default 100, on the `jobs` protocol
 *    with `logs: true`) with p99 ≤ 100 ms and every line delivered, next to progress messages
 *    per second (`report()`, the same watchers without logs) in the same run. Each step runs a
 *    rate for `--seconds`; the rate doubles until p99 goes over 100 ms or something is missing.
 *    The latency of a line is from the worker's `log()` call to its arrival at a watcher (the line
 *    carries its send time); of a progress report, from `report()` to the `job_update` (its
 *    `data` carries the send time).
 * 2. Redis commands per job event (stream entries BullMQ wrote) with the owner feed on and off,
 *    at 1 and 4 instances, each instance with one `subscribe_mine` client of the owner and one
 *    watcher per job: INFO commandstats deltas over J jobs run to completion.
 *
 * Every process here is one Node process (apps, worker and clients): figures are for comparing
 * the two kinds of message and the instance counts of one run, not absolute capacities.
 *
 *   npx tsx bench/logs.ts [--quick] [--watchers=100] [--seconds=3] [--jobs=200]
 */
import Fastify, { type FastifyInstance } from 'fastify'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { createJobWorker, jobProgress, jobsProtocol, DiskStorage, type JobContext } from '../lib/index'
import { BenchRedis, redisDelta } from './lib/redis'
import { percentiles, table } from './lib/stats'

const quick = process.argv.includes('--quick')
const arg = (name: string, dflt: number): number => Number(process.argv.find(a => a.startsWith(`--${name}=`))?.split('=')[1] ?? dflt)
const WATCHERS = arg('watchers', 100)
const SECONDS = arg('seconds', quick ? 1.5 : 4)
const JOBS = arg('jobs', quick ? 60 : 200)
const START_RATE = quick ? 100 : 250
const MAX_RATE = quick ? 8000 : 32000
const OWNER = 'bench-owner'
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

async function app (redisUrl: string, uploadDir: string, feed: boolean): Promise<{ app: FastifyInstance, ws: string, url: string }> {
  const a = Fastify({ logger: false })
  await a.register(jobProgress, {
    connection: redisUrl,
    kinds: { bench: {} },
    getOwner: () => OWNER,
    throttleMs: 0,
    maxConnectionsPerOwner: 1_000_000,
    maxSubscriptionsPerConnection: 10_000,
    uploadDir,
    protocols: [jobsProtocol({ path: '/ws/jobs' })],
    myJobs: { feed }
  })
  await a.listen({ port: 0, host: '127.0.0.1' })
  const { port } = a.server.address() as { port: number }
  return { app: a, ws: `ws://127.0.0.1:${port}`, url: `http://127.0.0.1:${port}` }
}

async function socket (url: string, onMessage: (m: any) => void): Promise<WebSocket> {
  const ws = new WebSocket(url)
  ws.on('message', (data) => onMessage(JSON.parse(String(data))))
  await new Promise<void>((resolve, reject) => { ws.once('open', () => resolve()); ws.once('error', reject) })
  return ws
}

/** A job held by a worker whose processor runs what the bench hands it. */
async function heldJob (a: { app: FastifyInstance }, redisUrl: string, uploadDir: string): Promise<{ jobId: string, ctx: JobContext, release: () => void, close: () => Promise<void> }> {
  const { jobId } = await a.app.jobProgress.enqueue('bench', { data: {}, owner: OWNER })
  let release!: () => void
  const held = new Promise<void>(resolve => { release = resolve })
  let got!: (ctx: JobContext) => void
  const ctxReady = new Promise<JobContext>(resolve => { got = resolve })
  const worker = createJobWorker({ kind: 'bench', connection: redisUrl, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    got(ctx)
    await held
    return {}
  })
  worker.on('error', () => {})
  return { jobId, ctx: await ctxReady, release, close: async () => await worker.close() }
}

interface Step { rate: number, p50: number, p99: number, delivered: number, expected: number }

/** Sends `rate` messages per second for SECONDS, in ticks of 10 ms, and measures arrival at every watcher. */
async function step (rate: number, send: (sentAt: number) => Promise<unknown>, received: number[][], settle: () => boolean): Promise<Step> {
  for (const r of received) r.length = 0
  const total = Math.round(rate * SECONDS)
  const started = performance.now()
  let sent = 0
  const inflight: Array<Promise<unknown>> = []
  while (sent < total) {
    const due = Math.min(total, Math.floor((performance.now() - started) / 1000 * rate) + 1)
    while (sent < due) {
      inflight.push(send(performance.timeOrigin + performance.now()).catch(() => {}))
      sent++
    }
    await sleep(10)
  }
  await Promise.all(inflight)
  const deadline = Date.now() + 3000
  while (!settle() && Date.now() < deadline) await sleep(20)
  const stats = percentiles(received.map(r => Float64Array.from(r)))
  return { rate, p50: stats.p50, p99: stats.p99, delivered: received.reduce((n, r) => n + r.length, 0), expected: total * received.length }
}

async function rates (redis: BenchRedis, uploadDir: string): Promise<{ logs: Step[], progress: Step[] }> {
  const a = await app(redis.url, uploadDir, true)
  const job = await heldJob(a, redis.url, uploadDir)
  const logLatency: number[][] = Array.from({ length: WATCHERS }, () => [])
  const progressLatency: number[][] = Array.from({ length: WATCHERS }, () => [])
  const sockets: WebSocket[] = []
  let truncated = 0
  for (let i = 0; i < WATCHERS; i++) {
    // Every socket asks for logs; each step sends one kind of message only.
    const logs = logLatency[i]
    const progress = progressLatency[i]
    sockets.push(await socket(`${a.ws}/ws/jobs`, (m) => {
      const now = performance.timeOrigin + performance.now()
      if (m.type === 'log') logs.push(now - Number(m.line))
      else if (m.type === 'logs_truncated') truncated++
      else if (m.type === 'job_update' && typeof m.data?.t === 'number') progress.push(now - m.data.t)
    }))
  }
  const subscribed = sockets.map(async (ws) => await new Promise<void>(resolve => {
    ws.on('message', (d) => { if (JSON.parse(String(d)).type === 'job_update') resolve() })
  }))
  sockets.forEach(ws => ws.send(JSON.stringify({ action: 'subscribe', job_id: job.jobId, logs: true })))
  await Promise.all(subscribed)
  // The first job_update of each socket is the snapshot, not a measured report.
  for (const r of progressLatency) r.length = 0

  const out = { logs: [] as Step[], progress: [] as Step[] }
  let seq = 0
  for (const kind of ['logs', 'progress'] as const) {
    for (let rate = START_RATE; rate <= MAX_RATE; rate *= 2) {
      truncated = 0
      const received = kind === 'logs' ? logLatency : progressLatency
      const s = await step(rate,
        kind === 'logs'
          ? async (t) => await job.ctx.log(String(t))
          : async (t) => await job.ctx.report(++seq, 1e9, { data: { t } }),
        received,
        () => received.every(r => r.length >= Math.round(rate * SECONDS)))
      out[kind].push(s)
      process.stdout.write(`  ${kind} ${rate}/s: p50 ${s.p50.toFixed(1)} ms, p99 ${s.p99.toFixed(1)} ms, delivered ${s.delivered}/${s.expected}${truncated > 0 ? `, ${truncated} logs_truncated` : ''}\n`)
      // Progress is a state: a newer report may replace one not yet sent (conflation), so only
      // its latency counts; a log line must arrive, every one.
      if (s.p99 > 100 || (kind === 'logs' && s.delivered < s.expected)) break
    }
  }
  for (const ws of sockets) ws.terminate()
  job.release()
  await job.close()
  await a.app.close()
  return out
}

/** Redis commands per stream event: J jobs, two reports each, run to completion across N instances. */
async function costPerEvent (redis: BenchRedis, uploadDir: string, instances: number, feed: boolean): Promise<{ perEvent: number, publishPerEvent: number, events: number }> {
  await redis.flush()
  const apps = await Promise.all(Array.from({ length: instances }, async () => await app(redis.url, uploadDir, feed)))
  const sockets: WebSocket[] = []
  const finals = new Set<string>()
  for (const a of apps) {
    const ws = await socket(`${a.ws}/ws/jobs`, (m) => { if (m.type === 'job_update' && m.status === 'succeeded') finals.add(`${a.url} ${m.job_id as string}`) })
    ws.send(JSON.stringify({ action: 'subscribe_mine' }))
    sockets.push(ws)
  }
  await sleep(200)
  const ids: string[] = []
  for (let i = 0; i < JOBS; i++) ids.push((await apps[i % instances].app.jobProgress.enqueue('bench', { data: {}, owner: OWNER })).jobId)
  // One watcher per job on each instance: every event reaches every instance.
  for (const ws of sockets) for (const id of ids) ws.send(JSON.stringify({ action: 'subscribe', job_id: id }))
  await sleep(300)
  const before = await redis.snapshot()
  const eventsBefore = Number(await redis.info.call('XINFO', 'STREAM', 'bull:bench:events').then((r: any) => r[r.indexOf('entries-added') + 1]))
  const worker = createJobWorker({ kind: 'bench', connection: redis.url, storage: new DiskStorage(uploadDir), workerOptions: { concurrency: 10 } }, async (ctx) => {
    await ctx.report(1, 2)
    await ctx.report(2, 2)
    return {}
  })
  worker.on('error', () => {})
  const deadline = Date.now() + 60_000
  while (finals.size < ids.length * instances && Date.now() < deadline) await sleep(50)
  await worker.close()
  const after = await redis.snapshot()
  const eventsAfter = Number(await redis.info.call('XINFO', 'STREAM', 'bull:bench:events').then((r: any) => r[r.indexOf('entries-added') + 1]))
  const delta = redisDelta(before, after)
  const events = eventsAfter - eventsBefore
  const publishes = (after.commands.publish ?? 0) - (before.commands.publish ?? 0)
  for (const ws of sockets) ws.terminate()
  await Promise.all(apps.map(async a => await a.app.close()))
  return { perEvent: delta.commands / events, publishPerEvent: publishes / events, events }
}

async function main (): Promise<void> {
  const redis = await BenchRedis.start()
  process.on('exit', () => redis.kill())
  const uploadDir = mkdtempSync(join(tmpdir(), 'jp-bench-logs-'))
  try {
    process.stdout.write(`live logs bench (redis ${BenchRedis.version()}, ${WATCHERS} watchers, ${SECONDS} s per step${quick ? ', quick' : ''})\n`)
    const r = await rates(redis, uploadDir)
    const best = (steps: Step[], all: boolean): Step | undefined => steps.filter(s => s.p99 <= 100 && (!all || s.delivered >= s.expected)).at(-1)
    const bestLogs = best(r.logs, true)
    const bestProgress = best(r.progress, false)
    const row = (name: string, s: Step | undefined): Array<string | number> => [name, s?.rate ?? 0, s === undefined ? '-' : s.p99.toFixed(1), s === undefined ? '-' : `${(100 * s.delivered / s.expected).toFixed(1)}%`,
      s === undefined || bestProgress === undefined ? '-' : (s.rate / bestProgress.rate).toFixed(2)]
    process.stdout.write(table(`Highest rate one job sends to ${WATCHERS} watchers with p99 ≤ 100 ms (log lines: every one delivered)`, ['message', 'rate/s', 'p99 ms', 'delivered', 'ratio to progress'],
      [row('log lines', bestLogs), row('progress reports', bestProgress)]) + '\n')
    const rows: Array<Array<string | number>> = []
    for (const instances of [1, 4]) {
      for (const feed of [false, true]) {
        const c = await costPerEvent(redis, uploadDir, instances, feed)
        rows.push([instances, feed ? 'on' : 'off', c.events, c.perEvent.toFixed(2), c.publishPerEvent.toFixed(2)])
      }
    }
    process.stdout.write(table('Redis commands per job event (stream entry), every instance watching every job and following the owner', ['instances', 'owner feed', 'events', 'commands/event', 'PUBLISH/event'], rows) + '\n')
  } finally {
    rmSync(uploadDir, { recursive: true, force: true })
    await redis.stop()
  }
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`)
  process.exitCode = 1
})
