import t from 'tap'
import { request as httpRequest, type ClientRequest } from 'node:http'
import type { Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'
import { Redis } from 'ioredis'
import { jobsProtocol } from '../lib/index'
import { Client, eventually, lines, redisFor, startApp, upload, type RedisServer, type TestApp } from './helpers/index'

// An owner whose connections come and go every way a flaky network ends them (closed cleanly,
// reset before the greeting, reset after a subscribe), on every kind of connection (the per-job
// socket, `jobs`, a job's SSE stream, the jobs feed), must still have all of its places after:
// a slot is counted by the connection's id, so it goes with the connection whatever happens.

const MAX = 50
const CYCLES = 1_500
const IN_FLIGHT = 25
const JOBS_PATH = '/ws/jobs'

type Kind = 'progress' | 'jobs' | 'sse' | 'feed'
type End = 'clean' | 'reset-early' | 'reset-late'
const KINDS: Kind[] = ['progress', 'jobs', 'sse', 'feed']
const ENDS: End[] = ['clean', 'reset-early', 'reset-late']

interface Target { app: TestApp, apps: TestApp[], cookie: string, jobId: string }

/** Destroys a TCP connection with a reset (RST), as a dropped mobile network or a killed tab does. */
function reset (socket: Socket | null | undefined): void {
  if (socket == null || socket.destroyed) return
  if (typeof socket.resetAndDestroy === 'function') socket.resetAndDestroy()
  else socket.destroy()
}

async function within<T> (promise: Promise<T>, ms: number): Promise<T | null> {
  let timer: NodeJS.Timeout | undefined
  const late = new Promise<null>(resolve => { timer = setTimeout(() => resolve(null), ms) })
  try {
    return await Promise.race([promise, late])
  } finally {
    clearTimeout(timer)
  }
}

async function socketCycle (target: Target, kind: 'progress' | 'jobs', end: End): Promise<void> {
  const url = kind === 'progress' ? `${target.app.ws}/ws/batch/${target.jobId}` : `${target.app.ws}${JOBS_PATH}`
  const ws = new WebSocket(url, { headers: { cookie: target.cookie } })
  ws.on('error', () => {})
  const raw = (): Socket | undefined => (ws as unknown as { _socket?: Socket })._socket
  const closed = new Promise<void>(resolve => ws.once('close', () => resolve()))
  const first = new Promise<void>(resolve => ws.once('message', () => resolve()))
  if (end === 'reset-early') {
    // Before the greeting: as soon as the upgrade is answered, while the server still authenticates.
    await within(new Promise<void>(resolve => ws.once('upgrade', () => resolve())), 1_000)
    reset(raw())
    ws.terminate()
    return
  }
  await within(first, 1_000)
  if (end === 'reset-late') {
    if (kind === 'jobs' && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ action: 'subscribe', job_id: target.jobId }))
      await within(new Promise<void>(resolve => ws.once('message', () => resolve())), 1_000)
    }
    reset(raw())
    ws.terminate()
    return
  }
  ws.close(1000)
  await within(closed, 1_000)
  ws.terminate()
}

async function sseCycle (target: Target, kind: 'sse' | 'feed', end: End): Promise<void> {
  const path = kind === 'sse' ? `/batch/${target.jobId}/events` : '/job-progress/jobs/events'
  let req: ClientRequest | null = null
  const answered = new Promise<import('node:http').IncomingMessage | null>(resolve => {
    req = httpRequest(`${target.app.url}${path}`, { headers: { cookie: target.cookie, accept: 'text/event-stream' } }, resolve)
    req.on('error', () => resolve(null))
    req.end()
  })
  const r = req as unknown as ClientRequest
  if (end === 'reset-early') {
    // The request is sent; the stream is reset before its first event.
    await within(new Promise<void>(resolve => r.once('socket', (s: Socket) => s.once('connect', () => resolve()))), 1_000)
    await sleep(1)
    reset(r.socket)
    r.destroy()
    return
  }
  const res = await within(answered, 1_000)
  if (res !== null) {
    // The first event (the subscribe is in effect), then the end.
    await within(new Promise<void>(resolve => { res.once('data', () => resolve()); res.once('close', () => resolve()) }), 1_000)
  }
  if (end === 'reset-late') reset(r.socket)
  r.destroy()
}

async function cycle (all: Target, i: number): Promise<void> {
  // Round robin over the instances, as a load balancer without sticky sessions.
  const target = { ...all, app: all.apps[i % all.apps.length] }
  const kind = KINDS[i % KINDS.length]
  const end = ENDS[Math.floor(i / KINDS.length) % ENDS.length]
  if (kind === 'progress' || kind === 'jobs') await socketCycle(target, kind, end)
  else await sseCycle(target, kind, end)
}

async function churn (target: Target, cycles: number, during?: (done: number) => Promise<void>): Promise<void> {
  let next = 0
  let done = 0
  const hooks: Array<Promise<void>> = []
  await Promise.all(Array.from({ length: IN_FLIGHT }, async () => {
    while (next < cycles) {
      const i = next++
      await cycle(target, i)
      done++
      if (during !== undefined && done % 100 === 0) hooks.push(during(done))
    }
  }))
  await Promise.all(hooks)
}

/**
 * Opens `n` `jobs` sockets of the owner one after another (each waits for the previous one's
 * answer, as a page opening its views does); resolves with how many got `connected` and the
 * closes of the others.
 */
async function openAll (target: Target, n: number): Promise<{ opened: number, refused: string[], clients: Client[] }> {
  const clients: Client[] = []
  const outcomes: string[] = []
  for (let i = 0; i < n; i++) {
    const c = new Client(`${target.app.ws}${JOBS_PATH}`, { headers: { cookie: target.cookie } })
    clients.push(c)
    outcomes.push(await Promise.race([
      c.waitFor(m => m?.type === 'connected', 10_000).then(() => 'connected', () => 'none'),
      c.closed.then(({ code, reason }) => `${code} ${reason}`)
    ]))
  }
  return { opened: outcomes.filter(o => o === 'connected').length, refused: outcomes.filter(o => o !== 'connected'), clients }
}

/**
 * Whether every one of `clients` holds its slot across instances too: a connection starts on this
 * instance's count and is closed if Redis then says the owner is full, so `connected` alone does
 * not tell.
 */
async function allConfirmed (redis: RedisServer, target: Target, clients: Client[]): Promise<boolean> {
  const direct = new Redis(redis.url)
  try {
    const owner = `session:${decodeURIComponent(target.cookie.split('=')[1]).split('.')[0]}`
    await eventually(async () => await direct.hlen(`jp:conn-ids:{${owner}}`) === clients.length, 5_000).catch(() => {})
    return clients.every(c => c.socket.readyState === WebSocket.OPEN)
  } finally {
    direct.disconnect()
  }
}

/** Two instances of one app on one Redis, and an owner (a session) with a job. */
async function setUp (t: { teardown: (fn: () => unknown) => void }, redis: RedisServer): Promise<Target> {
  const opts = { maxConnectionsPerOwner: MAX, instanceHeartbeatMs: 200, protocols: [jobsProtocol({ path: JOBS_PATH })] }
  const app = await startApp(t, redis, opts)
  const other = await startApp(t, redis, { ...opts, uploadDir: app.uploadDir })
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  return { app, apps: [app, other], cookie: up.cookie as string, jobId: up.body.job_id }
}

t.test(`${CYCLES} connect/close cycles on 4 kinds of connection, ended 3 ways: then all ${MAX} places are free`, async (t) => {
  const redis = await redisFor(t)
  const target = await setUp(t, redis)
  const started = Date.now()
  await churn(target, CYCLES)
  t.comment(`churn: ${CYCLES} cycles in ${((Date.now() - started) / 1000).toFixed(1)} s`)
  await eventually(() => target.apps.every(a => a.app.jobProgress.stats().sockets === 0), 5_000)
  t.same(target.apps.map(a => a.app.jobProgress.stats().sockets), [0, 0], 'no session outlives its connection')
  const { opened, refused, clients } = await openAll(target, MAX)
  t.teardown(() => { for (const c of clients) c.close() })
  t.comment(`after the churn: ${opened} of ${MAX} sockets opened; refused: ${refused.slice(0, 3).join('; ')}`)
  t.equal(opened, MAX, `all ${MAX} new sockets open`)
  t.ok(await allConfirmed(redis, target, clients), 'and hold their places across instances')
})

t.test('the same churn with Redis paused (SIGSTOP) for a while in the middle, while the owner\'s open sockets drop: all places free once it is back', async (t) => {
  const redis = await redisFor(t)
  const target = await setUp(t, redis)
  // A page with sockets open when Redis stalls; they drop (reset) while connects are waiting on it.
  const held = await openAll({ ...target, app: target.apps[0] }, 20)
  t.equal(held.opened, 20)
  let paused = false
  await churn(target, CYCLES, async (done) => {
    if (done !== 500 || paused) return
    paused = true
    redis.signal('SIGSTOP')
    await sleep(300)
    for (const c of held.clients) reset((c.socket as unknown as { _socket?: Socket })._socket)
    await sleep(1_700)
    redis.signal('SIGCONT')
  })
  if (!paused) redis.signal('SIGCONT')
  await eventually(() => target.apps.every(a => a.app.jobProgress.stats().sockets === 0), 10_000)
  t.same(target.apps.map(a => a.app.jobProgress.stats().sockets), [0, 0], 'no session outlives its connection')
  // Whatever is left to put right is, within a heartbeat period (200 ms here).
  await sleep(500)
  const { opened, refused, clients } = await openAll(target, MAX)
  t.teardown(() => { for (const c of clients) c.close() })
  t.comment(`after the churn with a pause: ${opened} of ${MAX} sockets opened; refused: ${refused.slice(0, 3).join('; ')}`)
  t.equal(opened, MAX, `all ${MAX} new sockets open`)
  t.ok(await allConfirmed(redis, target, clients), 'and hold their places across instances')
})
