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
 *   npx tsx bench/idle-cost.ts [--active 20000] [--watched 200,2000,20000] [--seconds 10] [--per-job 5000]
 */
import Fastify from 'fastify'
import { Queue, Worker } from 'bullmq'
import { randomUUID } from 'node:crypto'
import WebSocket from 'ws'
import { createAdapter } from '@socket.io/redis-adapter'
import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { Server } from 'socket.io'
import { io as sioClient, type Socket } from 'socket.io-client'
import { jobProgress, jobsProtocol } from '../lib/index'
import { BenchRedis, redisDelta } from './lib/redis'

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : fallback
}
const ACTIVE = Number(arg('active', '20000'))
const WATCHED = arg('watched', '200,2000,20000').split(',').map(Number)
const SECONDS = Number(arg('seconds', '10'))
const PER_JOB = Number(arg('per-job', '5000'))
const PER_SOCKET = 100

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
    protocols: [jobsProtocol({ path: '/jobs' })]
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }

  const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))
  const rate = async (): Promise<number> => {
    const a = await redis.snapshot()
    await sleep(SECONDS * 1000)
    return redisDelta(a, await redis.snapshot()).commands / SECONDS
  }
  const baseline = await rate()
  process.stdout.write(`baseline (app running, nothing watched): ${baseline.toFixed(1)} commands/s\n\n`)
  process.stdout.write('| watched jobs | sockets | storm: all first messages | commands/s above baseline | per watched job |\n| --- | --- | --- | --- | --- |\n')

  for (const watched of WATCHED) {
    const sockets: WebSocket[] = []
    const started = Date.now()
    let pending = watched
    let done!: () => void
    const all = new Promise<void>(resolve => { done = resolve })
    for (let s = 0; s * PER_SOCKET < watched; s++) {
      const mine = ids.slice(s * PER_SOCKET, Math.min(watched, (s + 1) * PER_SOCKET))
      const ws = new WebSocket(`ws://127.0.0.1:${port}/jobs`)
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
    const storm = Date.now() - started
    const busy = await rate() - baseline
    process.stdout.write(`| ${watched} | ${sockets.length} | ${(storm / 1000).toFixed(2)} s | ${busy.toFixed(2)} | ${(busy / watched).toFixed(5)} |\n`)
    for (const ws of sockets) ws.terminate()
    await sleep(1000)
  }
  const perJob: { plugin?: number, sio?: number } = {}
  if (PER_JOB > 0) {
    // One socket per job, all opened in the same tick: what a page of job cards does after a deploy.
    const sockets: WebSocket[] = []
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
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const sioPort = (server.address() as { port: number }).port
  process.stdout.write('\nSocket.IO + Redis adapter, same jobs:\n\n| watched jobs | sockets | storm: all rooms joined | commands/s above baseline | per watched job |\n| --- | --- | --- | --- | --- |\n')
  for (const watched of WATCHED) {
    const clients: Socket[] = []
    const started = Date.now()
    const acks: Array<Promise<unknown>> = []
    for (let s = 0; s * PER_SOCKET < watched; s++) {
      const mine = ids.slice(s * PER_SOCKET, Math.min(watched, (s + 1) * PER_SOCKET))
      const client = sioClient(`http://127.0.0.1:${sioPort}`, { transports: ['websocket'], forceNew: true })
      clients.push(client)
      for (const id of mine) acks.push(new Promise(resolve => client.emit('subscribe', id, resolve)))
    }
    await Promise.all(acks)
    const storm = Date.now() - started
    const busy = await rate() - baseline
    process.stdout.write(`| ${watched} | ${clients.length} | ${(storm / 1000).toFixed(2)} s | ${busy.toFixed(2)} | ${(busy / watched).toFixed(5)} |\n`)
    for (const c of clients) c.disconnect()
    await sleep(1000)
  }
  if (PER_JOB > 0) {
    const clients: Socket[] = []
    const started = Date.now()
    const acks: Array<Promise<unknown>> = []
    for (const id of ids.slice(0, Math.min(PER_JOB, ids.length))) {
      const client = sioClient(`http://127.0.0.1:${sioPort}`, { transports: ['websocket'], forceNew: true })
      clients.push(client)
      acks.push(new Promise(resolve => client.emit('subscribe', id, resolve)))
    }
    await Promise.all(acks)
    perJob.sio = Date.now() - started
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

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`)
  process.exit(1)
})
