/**
 * SSE next to WebSocket, on the same plugin server in the same run: RSS per idle connection, and
 * server CPU per 10,000 messages delivered.
 *
 *   npx tsx bench/sse.ts [--idle=1000] [--conns=100] [--updates=100]
 *
 * One plugin server process (bench/servers/plugin.ts, --expose-gc), a private redis-server, and
 * this process as the clients and the BullMQ worker that reports progress. For each transport:
 * `idle` connections each watching a queued job (RSS after a full GC, before and after); then
 * `conns` connections each watching one of `conns` active jobs while the worker reports `updates`
 * progress steps on each (server CPU seconds over the window, per 10,000 messages received).
 */
import { Queue, Worker } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { get } from 'node:http'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { Child, killAll, procCpuSeconds } from './lib/proc'
import { BenchRedis } from './lib/redis'

const arg = (name: string, dflt: number): number => Number(process.argv.find(a => a.startsWith(`--${name}=`))?.split('=')[1] ?? dflt)
const IDLE = arg('idle', 1000)
const CONNS = arg('conns', 100)
const UPDATES = arg('updates', 100)
const OWNER = 'bench-owner'

type Transport = 'websocket' | 'sse'
interface Conn { close: () => void, received: () => number }

function open (transport: Transport, port: number, jobId: string): Promise<Conn> {
  let count = 0
  if (transport === 'websocket') {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/bench/${jobId}`, { headers: { 'x-owner': OWNER } })
    ws.on('message', () => { count++ })
    ws.on('error', () => {})
    return new Promise((resolve, reject) => {
      ws.once('message', () => resolve({ close: () => ws.terminate(), received: () => count }))
      ws.once('close', () => reject(new Error('closed before its first message')))
    })
  }
  return new Promise((resolve, reject) => {
    const req = get(`http://127.0.0.1:${port}/bench/${jobId}/events`, { headers: { 'x-owner': OWNER, accept: 'text/event-stream' }, agent: false }, (res) => {
      if (res.statusCode !== 200) return reject(new Error(`SSE answered ${String(res.statusCode)}`))
      let first = true
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => {
        count += chunk.split('event: job_update').length - 1
        if (first && count > 0) { first = false; resolve({ close: () => res.destroy(), received: () => count }) }
      })
      res.on('error', () => {})
    })
    req.on('error', reject)
  })
}

async function main (): Promise<void> {
  const redis = await BenchRedis.start()
  const uploadDir = mkdtempSync(join(tmpdir(), 'jp-bench-sse-'))
  const queueName = 'bench-sse'
  const connection = { host: '127.0.0.1', port: redis.port, maxRetriesPerRequest: null }
  const server = new Child('bench/servers/plugin.ts', [], {
    label: 'plugin',
    node: ['--expose-gc'],
    manyFiles: true,
    env: { BENCH_CONFIG: JSON.stringify({ redisUrl: `redis://127.0.0.1:${redis.port}`, queue: queueName, uploadDir, fileSize: 1024 * 1024 }) }
  })
  const queue = new Queue(queueName, { connection })
  const rows: Array<Record<string, string | number>> = []
  try {
    const { port } = await server.ready as { port: number }
    for (const transport of ['websocket', 'sse'] as const) {
      // Idle: queued jobs nobody works on.
      const idleJobs = await queue.addBulk(Array.from({ length: IDLE }, () => ({ name: 'idle', data: { owner: OWNER }, opts: { jobId: randomUUID() } })))
      const before = await server.call<{ rss: number }>('memory')
      const idle: Conn[] = []
      for (let i = 0; i < IDLE; i += 50) idle.push(...await Promise.all(idleJobs.slice(i, i + 50).map(async j => await open(transport, port, j.id as string))))
      const after = await server.call<{ rss: number }>('memory')
      for (const c of idle) c.close()
      await queue.obliterate({ force: true })

      // Busy: CONNS jobs, one connection each, UPDATES progress steps per job.
      const gate = { open: null as null | (() => void) }
      const started = new Promise<void>(resolve => { gate.open = resolve })
      let running = 0
      const worker = new Worker(queueName, async (job) => {
        if (++running === CONNS) gate.open?.()
        await started
        for (let i = 1; i <= UPDATES; i++) await job.updateProgress({ processed: i, total: UPDATES })
        return { ok: true }
      }, { connection, concurrency: CONNS })
      const busyJobs = await queue.addBulk(Array.from({ length: CONNS }, () => ({ name: 'busy', data: { owner: OWNER }, opts: { jobId: randomUUID() } })))
      const conns = await Promise.all(busyJobs.map(async j => await open(transport, port, j.id as string)))
      const base = conns.reduce((n, c) => n + c.received(), 0)
      const cpu0 = procCpuSeconds(server.pid)
      const t0 = Date.now()
      const done = new Promise<void>(resolve => {
        let completed = 0
        worker.on('completed', () => { if (++completed === CONNS) resolve() })
      })
      await done
      // The final messages are on their way: wait until every connection has its last one.
      const deadline = Date.now() + 10_000
      while (Date.now() < deadline && conns.some(c => c.received() < 2)) await new Promise(resolve => setTimeout(resolve, 20))
      await new Promise(resolve => setTimeout(resolve, 300))
      const cpu = procCpuSeconds(server.pid) - cpu0
      const messages = conns.reduce((n, c) => n + c.received(), 0) - base
      for (const c of conns) c.close()
      await worker.close()
      await queue.obliterate({ force: true })
      rows.push({
        transport,
        'idle connections': IDLE,
        'RSS KB per idle connection': Math.round((after.rss - before.rss) / IDLE / 1024 * 10) / 10,
        'messages delivered': messages,
        'server CPU ms per 10k messages': Math.round(cpu / messages * 10_000 * 1000),
        'window s': Math.round((Date.now() - t0) / 100) / 10
      })
    }
    const keys = Object.keys(rows[0])
    console.log(`| ${keys.join(' | ')} |\n| ${keys.map(() => '---').join(' | ')} |`)
    for (const r of rows) console.log(`| ${keys.map(k => r[k]).join(' | ')} |`)
    writeFileSync(join(__dirname, 'results', 'sse.json'), JSON.stringify({ date: new Date().toISOString(), idle: IDLE, conns: CONNS, updates: UPDATES, rows }, null, 2) + '\n')
  } finally {
    await queue.close()
    await server.stop()
    await redis.stop()
    rmSync(uploadDir, { recursive: true, force: true })
    killAll()
  }
}

main().catch((err) => {
  console.error(err)
  killAll()
  process.exit(1)
})
