import { Queue, QueueEvents, Worker, type Job } from 'bullmq'
import Fastify from 'fastify'
import { spawn, type ChildProcess } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { createServer } from 'node:http'
import { WebSocket, WebSocketServer } from 'ws'
import { BenchRedis } from './lib/redis'
import { table } from './lib/stats'

/**
 * What the young generation's collections cost each system at the tail workload's load (50 jobs ×
 * 10 sockets, 10 updates/s per job): objects that outlive a scavenge are copied, then promoted,
 * and make it long; a scavenge stops the event loop and every message waiting behind it. Each
 * system runs alone in its own process with `--trace-gc-nvp`, one instance, the worker in the
 * same process and the sockets in another; the table gives, over the scavenges of the measured
 * seconds, the bytes promoted per scavenge and the pauses. Unlike a latency figure, this barely
 * depends on what else the machine runs.
 *
 *   npx tsx bench/scavenge.ts [--seconds=10] [--rounds=2]
 *   BENCH_CANDIDATE=/abs/path/lib/index.ts npx tsx bench/scavenge.ts   # a changed copy of lib/ too
 */
const JOBS = 50
const PER_JOB = 10
const RATE = 10
const OWNER = 'bench-owner'

type Role = 'plugin' | 'candidate' | 'floor'

/** One system under load; prints "measure" when the measured window starts and "done" when it ends. */
async function serve (role: Role, redisUrl: string, seconds: number): Promise<void> {
  const url = new URL(redisUrl)
  const connection = { host: url.hostname, port: Number(url.port), maxRetriesPerRequest: null }
  const queueName = `gc-${randomUUID()}`
  let port: number
  if (role === 'floor') {
    // The bench's floor server: one QueueEvents, each event straight to its job's sockets.
    const sockets = new Map<string, Set<WebSocket>>()
    const server = createServer()
    const wss = new WebSocketServer({ server })
    wss.on('connection', (ws, req) => {
      const jobId = (req.url ?? '').split('/').pop() as string
      let set = sockets.get(jobId)
      if (set === undefined) sockets.set(jobId, set = new Set())
      set.add(ws)
      ws.on('error', () => {})
    })
    const events = new QueueEvents(queueName, { connection })
    events.on('progress', ({ jobId, data }) => {
      const set = sockets.get(jobId)
      if (set === undefined) return
      const { processed, total } = data as { processed: number, total: number }
      const message = JSON.stringify({ job_id: jobId, status: 'processing', progress: total > 0 ? Math.round(processed / total * 1000) / 10 : 0, processed, total, eta_seconds: null })
      for (const ws of set) ws.send(message)
    })
    await events.waitUntilReady()
    await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
    port = (server.address() as { port: number }).port
  } else {
    const path = role === 'candidate' ? process.env.BENCH_CANDIDATE as string : '../lib/index'
    const { jobProgress } = await import(path) as typeof import('../lib/index')
    const app = Fastify({ logger: false })
    await app.register(jobProgress, {
      connection: redisUrl,
      kinds: { bench: { queueName } },
      getOwner: (request) => request.headers['x-owner'] as string | undefined,
      throttleMs: 0,
      maxConnectionsPerOwner: 1_000_000
    })
    await app.listen({ port: 0, host: '127.0.0.1' })
    port = (app.server.address() as { port: number }).port
  }
  // The driver: a worker holds every job active, and each job reports RATE times a second.
  const queue = new Queue(queueName, { connection })
  const ids = Array.from({ length: JOBS }, () => randomUUID())
  await queue.addBulk(ids.map(jobId => ({ name: 'bench', data: { owner: OWNER }, opts: { jobId } })))
  const active: Job[] = []
  const worker = new Worker(queueName, async (job) => {
    active.push(job)
    await new Promise(() => {})
  }, { connection, concurrency: JOBS, lockDuration: 600_000, stalledInterval: 600_000 })
  worker.on('error', () => {})
  while (active.length < JOBS) await new Promise(resolve => setTimeout(resolve, 20))
  const clients = spawn(process.execPath, [...process.execArgv.filter(a => !a.startsWith('--trace-gc')), __filename, '--clients', String(port), ...ids], { stdio: ['ignore', 'pipe', 'inherit'] })
  // The sockets' process reports how many messages they got so far.
  let received = 0
  clients.stdout?.setEncoding('utf8').on('data', (text: string) => {
    const last = text.trim().split('\n').pop()
    if (last !== undefined && last !== '') received = Number(last)
  })
  // Update g is due at t0 + g × gap (job g % JOBS): what a late timer missed is sent at once.
  const gap = 1000 / (JOBS * RATE)
  const t0 = performance.now()
  let g = 0
  const tick = setInterval(() => {
    for (const now = performance.now(); t0 + g * gap <= now; g++) {
      active[g % JOBS].updateProgress({ processed: g + 1, total: 1_000_000_000 }).catch(() => {})
    }
  }, 5)
  // Warm-up: sockets open, code optimised, the heap grown to its working size.
  await new Promise(resolve => setTimeout(resolve, 3_000))
  const from = received
  process.stdout.write('measure\n')
  await new Promise(resolve => setTimeout(resolve, seconds * 1000))
  process.stdout.write('done\n')
  // Counted up to half a second late: enough to tell a system that delivers from one that does not.
  process.stdout.write(`delivered ${(received - from) / seconds}\n`)
  clearInterval(tick)
  clients.kill()
  process.exit(0)
}

/** The sockets, in a process of their own: their garbage is not the system's. */
function clientsMain (port: string, ids: string[]): void {
  let received = 0
  setInterval(() => process.stdout.write(`${received}\n`), 500)
  for (const id of ids) {
    for (let i = 0; i < PER_JOB; i++) {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/bench/${id}`, { headers: { 'x-owner': OWNER }, perMessageDeflate: false })
      ws.on('error', () => {})
      ws.on('message', () => { received++ })
    }
  }
}

interface Scavenges { n: number, promotedKB: number[], pauseMs: number[], delivered: number[] }

/** Runs one system in a child with --trace-gc-nvp and reads its scavenges within the measured window. */
async function measure (role: Role, redisUrl: string, seconds: number): Promise<Scavenges> {
  const child: ChildProcess = spawn(process.execPath, [...process.execArgv, '--trace-gc-nvp', __filename, '--serve', role, redisUrl, String(seconds)], { stdio: ['ignore', 'pipe', 'pipe'] })
  const out: Scavenges = { n: 0, promotedKB: [], pauseMs: [], delivered: [] }
  let measuring = false
  let err = ''
  child.stderr?.setEncoding('utf8').on('data', (text: string) => { err += text })
  // V8 writes its trace to stdout, in order with the markers.
  let rest = ''
  child.stdout?.setEncoding('utf8').on('data', (text: string) => {
    const lines = (rest + text).split('\n')
    rest = lines.pop() as string
    for (const line of lines) {
      if (line === 'measure') measuring = true
      else if (line === 'done') measuring = false
      else if (line.startsWith('delivered ')) out.delivered.push(Number(line.slice(10)))
      else if (measuring && line.includes(' gc=s ')) {
        out.n++
        out.pauseMs.push(Number(/ pause=([\d.]+)/.exec(line)?.[1]))
        out.promotedKB.push(Number(/ promoted=(\d+)/.exec(line)?.[1]) / 1024)
      }
    }
  })
  const code = await new Promise<number | null>(resolve => child.on('exit', resolve))
  if (code !== 0) throw new Error(`${role} ended with ${String(code)}: ${err.slice(-2000)}`)
  return out
}

const median = (xs: number[]): number => {
  if (xs.length === 0) return NaN
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.floor((s.length - 1) / 2)]
}

async function main (): Promise<void> {
  const args = process.argv.slice(2)
  if (args[0] === '--clients') return clientsMain(args[1], args.slice(2))
  if (args[0] === '--serve') return await serve(args[1] as Role, args[2], Number(args[3]))
  const seconds = Number(args.find(a => a.startsWith('--seconds='))?.slice(10) ?? 10)
  const rounds = Number(args.find(a => a.startsWith('--rounds='))?.slice(9) ?? 2)
  const roles: Role[] = process.env.BENCH_CANDIDATE === undefined ? ['plugin', 'floor'] : ['plugin', 'candidate', 'floor']
  const redis = await BenchRedis.start()
  const all = new Map<Role, Scavenges>(roles.map(r => [r, { n: 0, promotedKB: [], pauseMs: [], delivered: [] }]))
  try {
    for (let round = 0; round < rounds; round++) {
      // Turns rotate, so that no system always runs after the same neighbour.
      for (let k = 0; k < roles.length; k++) {
        const role = roles[(k + round) % roles.length]
        const s = await measure(role, redis.url, seconds)
        const into = all.get(role) as Scavenges
        into.n += s.n
        into.promotedKB.push(...s.promotedKB)
        into.pauseMs.push(...s.pauseMs)
        into.delivered.push(...s.delivered)
        await redis.flush()
      }
    }
  } finally {
    await redis.stop()
  }
  const fmt = (x: number, digits: number): string => Number.isFinite(x) ? x.toFixed(digits) : '-'
  process.stdout.write(table(`Scavenges at ${JOBS} jobs × ${PER_JOB} sockets, ${RATE} updates/s per job, one instance, ${rounds} × ${seconds} s per system`,
    ['system', 'msgs/s', 'scavenges', 'promoted KB median', 'promoted KB max', 'pause ms median', 'pause ms max'],
    [...all].map(([role, s]) => [role, fmt(median(s.delivered), 0), s.n, fmt(median(s.promotedKB), 0), fmt(Math.max(...s.promotedKB), 0), fmt(median(s.pauseMs), 1), fmt(Math.max(...s.pauseMs), 1)])) + '\n')
}

main().catch((err) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
