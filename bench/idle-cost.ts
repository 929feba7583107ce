/**
 * Idle cost and subscribe storms, in jobs: ACTIVE jobs held active (locked, nothing reporting),
 * W of them watched on the `jobs` protocol (100 subscriptions per socket), for each W given.
 * Reports the time until every subscription had its first message, and the Redis commands per
 * second per idle watched job above the baseline (the app running, nothing watched). Then a storm
 * of P per-job sockets (`/ws/<kind>/<jobId>`, one job each) opened at once: the time until every
 * one had its first message. The peer in the same run: Socket.IO with its Redis adapter, each
 * subscription an ownership read of the job then a room join, acknowledged (for the per-job
 * storm: P Socket.IO clients joining one room each).
 *
 * Each system first gets a storm of `--warmup` subscriptions (default 2,000, on the last jobs),
 * not measured: the measured storms then compare code that is compiled, not the cost of compiling it.
 *
 * After each storm (stderr): this process's CPU (user + system, from `process.cpuUsage`) and its
 * event-loop utilisation during it; both systems run in this one process, so the CPU each storm
 * costs is comparable. `--cpu-prof <storm>[,<storm>]` records a CPU profile of the storms named
 * (`plugin-<W>`, `sio-<W>`, `plugin-per-job`, `sio-per-job`, or `all`) into the temp directory;
 * summarise one with `npx tsx bench/profile.ts <file>.cpuprofile`, its allocations (a sampling heap
 * profile, garbage included) with `npx tsx bench/alloc.ts <file>.heapprofile`. A profiled storm is slower: its time is
 * not a figure.
 *
 *   npx tsx bench/idle-cost.ts [--active 20000] [--watched 200,2000,20000] [--seconds 10] [--per-job 5000] [--warmup 2000] [--commands] [--cpu-prof plugin-20000]
 */
import Fastify from 'fastify'
import { Queue, Worker } from 'bullmq'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { createAdapter } from '@socket.io/redis-adapter'
import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { Session as Inspector } from 'node:inspector/promises'
import { writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { performance, type EventLoopUtilization } from 'node:perf_hooks'
import { Server } from 'socket.io'
import { io as sioClient, type Socket } from 'socket.io-client'
import { jobProgress, jobsProtocol } from '../lib/index'
import { BenchRedis, redisDelta, type RedisDelta } from './lib/redis'

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : fallback
}
const ACTIVE = Number(arg('active', '20000'))
const WATCHED = arg('watched', '200,2000,20000').split(',').map(Number)
const SECONDS = Number(arg('seconds', '10'))
const PER_JOB = Number(arg('per-job', '5000'))
const PER_SOCKET = 100
/** Listen backlog of both servers (the kernel caps it at net.core.somaxconn). */
const BACKLOG = 8192
/** Subscriptions of the storm each system gets first, not measured (0: none). */
const WARMUP = Number(arg('warmup', '2000'))
/** With `--commands`: the Redis commands each storm cost, per subscription, by command (stderr). */
const COMMANDS = process.argv.includes('--commands')
const PROFILE = new Set(arg('cpu-prof', '').split(',').filter(p => p !== ''))

/** This process's CPU and event-loop utilisation over one storm, and its CPU profile when asked for. */
class Meter {
  readonly #label: string
  readonly #name: string
  readonly #cpu = process.cpuUsage()
  readonly #elu = performance.eventLoopUtilization()
  readonly #inspector: Inspector | null

  private constructor (label: string, name: string, inspector: Inspector | null) {
    this.#label = label
    this.#name = name
    this.#inspector = inspector
  }

  static async start (label: string, name: string): Promise<Meter> {
    if (!PROFILE.has(name) && !PROFILE.has('all')) return new Meter(label, name, null)
    const inspector = new Inspector()
    inspector.connect()
    await inspector.post('Profiler.enable')
    await inspector.post('Profiler.setSamplingInterval', { interval: 200 })
    await inspector.post('Profiler.start')
    // Allocation too, garbage included: collection is a large share of a storm's CPU.
    await inspector.post('HeapProfiler.startSampling', { samplingInterval: 4096, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: true } as never)
    return new Meter(label, name, inspector)
  }

  /** Writes the CPU and loop figures to stderr; per subscription in microseconds of CPU. */
  async stop (subscriptions: number): Promise<void> {
    const cpu = process.cpuUsage(this.#cpu)
    const elu: EventLoopUtilization = performance.eventLoopUtilization(this.#elu)
    const ms = (cpu.user + cpu.system) / 1000
    let note = ''
    if (this.#inspector !== null) {
      const { profile } = await this.#inspector.post('Profiler.stop')
      const { profile: heap } = await this.#inspector.post('HeapProfiler.stopSampling')
      this.#inspector.disconnect()
      const file = join(tmpdir(), `idle-cost-${this.#name}-${process.pid}`)
      writeFileSync(`${file}.cpuprofile`, JSON.stringify(profile))
      writeFileSync(`${file}.heapprofile`, JSON.stringify(heap))
      note = ` (profiled: ${file}.cpuprofile and .heapprofile, the latter for bench/alloc.ts)`
    }
    process.stderr.write(`${this.#label}: process CPU ${(ms / 1000).toFixed(2)} s (user ${(cpu.user / 1e6).toFixed(2)}, system ${(cpu.system / 1e6).toFixed(2)}), ${(ms * 1000 / subscriptions).toFixed(0)} us per subscription, event loop busy ${(elu.utilization * 100).toFixed(0)} % of ${(elu.active / 1000 / Math.max(elu.utilization, 1e-9)).toFixed(2)} s${note}\n`)
  }
}

async function main (): Promise<void> {
  const redis = await BenchRedis.start()
  process.on('exit', () => redis.kill())
  const connection = { host: '127.0.0.1', port: redis.port }
  const queue = new Queue('batch', { connection })
  const ids: string[] = []
  for (let i = 0; i < ACTIVE; i += 1000) {
    const chunk = Array.from({ length: Math.min(1000, ACTIVE - i) }, () => randomUUID())
    ids.push(...chunk)
    await queue.addBulk(chunk.map(jobId => ({ name: 'batch', data: { owner: 'bench' }, opts: { jobId } })))
  }
  // Held active by a worker that takes them and never reports: locks last the whole run.
  const worker = new Worker('batch', null, { connection, autorun: false, lockDuration: 3_600_000 })
  for (let i = 0; i < ACTIVE; i++) await worker.getNextJob('bench', { block: false })
  process.stdout.write(`${ACTIVE} active jobs (redis ${BenchRedis.version()})\n`)

  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection: redis.url,
    kinds: { batch: {} },
    getOwner: () => 'bench',
    maxConnectionsPerOwner: 100_000,
    protocols: [jobsProtocol({ path: '/ws/jobs' })]
  })
  // Both servers take the per-job storm's connections without a full accept queue: with Node's
  // default backlog (511) most of 5,000 connections opened at once are dropped and retried by
  // the kernel after 1, 3, 7 s ..., and the storm then measures those timers, not the servers.
  await app.listen({ port: 0, host: '127.0.0.1', backlog: BACKLOG })
  const { port } = app.server.address() as { port: number }

  const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))
  const rate = async (): Promise<number> => {
    const a = await redis.snapshot()
    await sleep(SECONDS * 1000)
    return redisDelta(a, await redis.snapshot()).commands / SECONDS
  }
  /** Subscribes `jobs` on the `jobs` protocol, 100 per socket; resolves once every one had its first message. */
  const pluginStorm = async (jobs: string[]): Promise<{ ms: number, sockets: WebSocket[] }> => {
    const sockets: WebSocket[] = []
    const started = Date.now()
    let pending = jobs.length
    let done!: () => void
    const all = new Promise<void>(resolve => { done = resolve })
    for (let s = 0; s * PER_SOCKET < jobs.length; s++) {
      const mine = jobs.slice(s * PER_SOCKET, (s + 1) * PER_SOCKET)
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/jobs`)
      sockets.push(ws)
      const first = new Set(mine)
      // Subscribes go out once the server said `connected`, as a client does: messages sent
      // before authentication ends are kept only up to a small limit, then the socket is closed.
      ws.on('message', (data) => {
        const m = JSON.parse(String(data)) as { type?: string, job_id?: string }
        if (m.type === 'connected') for (const id of mine) ws.send(JSON.stringify({ action: 'subscribe', job_id: id }))
        if (m.type === 'job_update' && m.job_id !== undefined && first.delete(m.job_id) && --pending === 0) done()
      })
      ws.on('close', (code, reason) => { if (first.size > 0) process.stderr.write(`jobs socket closed ${code} ${String(reason)} with ${first.size} subscriptions unanswered\n`) })
    }
    await all
    return { ms: Date.now() - started, sockets }
  }
  if (WARMUP > 0) {
    // Not measured: the first storm of a process also compiles its code, and the peer, measured
    // second, would find much of what it shares with the plugin (ws, ioredis) compiled already.
    const { sockets } = await pluginStorm(ids.slice(-WARMUP))
    for (const ws of sockets) ws.terminate()
    await sleep(1000)
  }
  const baseline = await rate()
  process.stdout.write(`baseline (app running, nothing watched): ${baseline.toFixed(1)} commands/s\n\n`)
  process.stdout.write('| watched jobs | sockets | storm: all first messages | commands/s above baseline | per watched job |\n| --- | --- | --- | --- | --- |\n')

  for (const watched of WATCHED) {
    const before = await redis.snapshot()
    const meter = await Meter.start(`plugin, ${watched} subscriptions`, `plugin-${watched}`)
    const { ms: storm, sockets } = await pluginStorm(ids.slice(0, watched))
    await meter.stop(watched)
    if (COMMANDS) stormCost(`plugin, ${watched} subscriptions`, redisDelta(before, await redis.snapshot()), watched)
    const busy = await rate() - baseline
    process.stdout.write(`| ${watched} | ${sockets.length} | ${(storm / 1000).toFixed(2)} s | ${busy.toFixed(2)} | ${(busy / watched).toFixed(5)} |\n`)
    for (const ws of sockets) ws.terminate()
    await sleep(1000)
  }
  const perJob: { plugin?: number, sio?: number } = {}
  if (PER_JOB > 0) {
    // One socket per job, all opened in the same tick: what a page of job cards does after a deploy.
    const sockets: WebSocket[] = []
    const before = await redis.snapshot()
    const meter = await Meter.start(`plugin, ${Math.min(PER_JOB, ids.length)} per-job sockets`, 'plugin-per-job')
    const started = Date.now()
    let pending = Math.min(PER_JOB, ids.length)
    let done!: () => void
    const all = new Promise<void>(resolve => { done = resolve })
    for (const id of ids.slice(0, pending)) {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/batch/${id}`)
      sockets.push(ws)
      ws.once('message', () => { if (--pending === 0) done() })
      ws.on('error', (err) => process.stderr.write(`per-job socket: ${err.message}\n`))
    }
    await all
    perJob.plugin = Date.now() - started
    await meter.stop(Math.min(PER_JOB, ids.length))
    if (COMMANDS) stormCost(`plugin, ${Math.min(PER_JOB, ids.length)} per-job sockets`, redisDelta(before, await redis.snapshot()), Math.min(PER_JOB, ids.length))
    for (const ws of sockets) ws.terminate()
    await sleep(1000)
  }
  await app.close()

  // The peer: Socket.IO with the Redis adapter.
  const pub = new Redis(redis.url)
  const sub = pub.duplicate()
  const server = createServer()
  const sio = new Server(server, { transports: ['websocket'], adapter: createAdapter(pub, sub) })
  sio.on('connection', (socket) => {
    socket.on('subscribe', (jobId: string, ack: (ok: boolean) => void) => {
      pub.hget(`bull:batch:${jobId}`, 'data').then(data => {
        if (data === null || (JSON.parse(data) as { owner?: string }).owner !== 'bench') return ack(false)
        void socket.join(`job:${jobId}`)
        ack(true)
      }, () => ack(false))
    })
  })
  await new Promise<void>(resolve => server.listen({ port: 0, host: '127.0.0.1', backlog: BACKLOG }, resolve))
  const sioPort = (server.address() as { port: number }).port
  process.stdout.write('\nSocket.IO + Redis adapter, same jobs:\n\n| watched jobs | sockets | storm: all rooms joined | commands/s above baseline | per watched job |\n| --- | --- | --- | --- | --- |\n')
  /** Joins `jobs` on Socket.IO, 100 per client; resolves once every join was acknowledged. */
  const sioStorm = async (jobs: string[]): Promise<{ ms: number, clients: Socket[] }> => {
    const clients: Socket[] = []
    const started = Date.now()
    const acks: Array<Promise<unknown>> = []
    for (let s = 0; s * PER_SOCKET < jobs.length; s++) {
      const mine = jobs.slice(s * PER_SOCKET, (s + 1) * PER_SOCKET)
      const client = sioClient(`http://127.0.0.1:${sioPort}`, { transports: ['websocket'], forceNew: true })
      clients.push(client)
      for (const id of mine) acks.push(new Promise(resolve => client.emit('subscribe', id, resolve)))
    }
    await Promise.all(acks)
    return { ms: Date.now() - started, clients }
  }
  if (WARMUP > 0) {
    const { clients } = await sioStorm(ids.slice(-WARMUP))
    for (const c of clients) c.disconnect()
    await sleep(1000)
  }
  for (const watched of WATCHED) {
    const before = await redis.snapshot()
    const meter = await Meter.start(`Socket.IO, ${watched} subscriptions`, `sio-${watched}`)
    const { ms: storm, clients } = await sioStorm(ids.slice(0, watched))
    await meter.stop(watched)
    if (COMMANDS) stormCost(`Socket.IO, ${watched} subscriptions`, redisDelta(before, await redis.snapshot()), watched)
    const busy = await rate() - baseline
    process.stdout.write(`| ${watched} | ${clients.length} | ${(storm / 1000).toFixed(2)} s | ${busy.toFixed(2)} | ${(busy / watched).toFixed(5)} |\n`)
    for (const c of clients) c.disconnect()
    await sleep(1000)
  }
  if (PER_JOB > 0) {
    const clients: Socket[] = []
    const meter = await Meter.start(`Socket.IO, ${Math.min(PER_JOB, ids.length)} per-job clients`, 'sio-per-job')
    const started = Date.now()
    const acks: Array<Promise<unknown>> = []
    for (const id of ids.slice(0, Math.min(PER_JOB, ids.length))) {
      const client = sioClient(`http://127.0.0.1:${sioPort}`, { transports: ['websocket'], forceNew: true })
      clients.push(client)
      acks.push(new Promise(resolve => client.emit('subscribe', id, resolve)))
    }
    await Promise.all(acks)
    perJob.sio = Date.now() - started
    await meter.stop(Math.min(PER_JOB, ids.length))
    for (const c of clients) c.disconnect()
    const n = Math.min(PER_JOB, ids.length)
    process.stdout.write(`\nStorm of ${n} per-job sockets opened at once, time until every one had its first message:\n\n| system | all first messages | ratio to Socket.IO |\n| --- | --- | --- |\n`)
    process.stdout.write(`| plugin (/ws/batch/<jobId>) | ${((perJob.plugin ?? 0) / 1000).toFixed(2)} s | ${((perJob.plugin ?? 0) / perJob.sio).toFixed(2)}x |\n`)
    process.stdout.write(`| Socket.IO + Redis adapter (one room each) | ${(perJob.sio / 1000).toFixed(2)} s | 1.00x |\n`)
  }
  await new Promise(resolve => sio.close(resolve))
  pub.disconnect()
  sub.disconnect()
  await worker.close()
  await queue.close()
  await redis.stop()
}

function stormCost (label: string, d: RedisDelta, subscriptions: number): void {
  const per = Object.entries(d.byCommand).sort((a, b) => b[1] - a[1]).map(([name, n]) => `${name} ${(n / subscriptions).toFixed(3)}`).join(', ')
  process.stderr.write(`${label}: Redis ${d.commands} commands (${(d.commands / subscriptions).toFixed(3)} per subscription: ${per}), Redis CPU ${d.cpu.toFixed(2)} s\n`)
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`)
  process.exit(1)
})
