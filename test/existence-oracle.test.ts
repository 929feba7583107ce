import t from 'tap'
import { randomUUID } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'
import { jobsProtocol } from '../lib/index'
import { redisFor, startApp, startWorker, TWO_APP_KEYS, uploadAs } from './helpers/index'

// No existence oracle (guarantee 5): asked by somebody else, every route and protocol answers a
// job of another owner and a job that does not exist with the same Redis commands (MONITOR on a
// private redis-server) and, within the noise, the same time. The command lists are the strict
// check; the timing is measured on a loaded machine and so tried up to three times.

const PATH = '/ws/jobs'
const BOB = 'key-bob'

// 400 tries of each side on seven routes, on a loaded machine: minutes, not seconds.
t.setTimeout(900_000)

t.test('somebody else\'s job and a missing one: the same Redis commands and the same time on every route', { timeout: 900_000 }, async (t) => {
  const redis = await redisFor(t)
  // Nothing in the background: no bridge, no sweep, no heartbeat within the test.
  const app = await startApp(t, redis, {
    apiKeys: TWO_APP_KEYS,
    protocols: [jobsProtocol({ path: PATH })],
    bridge: { enabled: false },
    sweepPeriodMs: 0,
    instanceHeartbeatMs: 3_600_000,
    ssePath: '/events',
    // 800 subscribes on one socket, as fast as they are answered.
    inbound: { messagesPerSecond: 1_000_000, burst: 1_000_000, maxInFlight: 256 }
  })
  // A completed job: its state is found at the first place the snapshot looks, the shortest read
  // there is, and it has a result to leak. The worker is closed before anything is counted.
  const theirs = await uploadAs(app, 'key-alice')
  const worker = startWorker(t, redis, 'batch', app.uploadDir)
  await new Promise(resolve => worker.once('completed', resolve))
  await worker.close()

  // monitor() opens a connection of its own: both are closed at the end.
  const client = redis.client()
  const monitor = await client.monitor()
  t.teardown(() => { monitor.disconnect(); client.disconnect() })
  const log: string[] = []
  monitor.on('monitor', (_time: string, args: string[]) => { log.push(String(args[0]).toLowerCase()) })

  const jobs = new WebSocket(`${app.ws}${PATH}?api_key=${BOB}`)
  t.teardown(() => jobs.terminate())
  const replies: Array<Record<string, unknown>> = []
  jobs.on('message', (data) => replies.push(JSON.parse(String(data))))
  await new Promise(resolve => jobs.once('open', resolve))
  while (!replies.some(m => m.type === 'connected')) await sleep(10)

  const http = (method: string, path: (id: string) => string) => async (id: string): Promise<string> => {
    const res = await fetch(`${app.url}${path(id)}`, { method, headers: { authorization: `Bearer ${BOB}` } })
    return `${res.status} ${await res.text()}`
  }
  const routes: Record<string, (id: string) => Promise<string>> = {
    'per-job socket': async (id) => await new Promise(resolve => {
      const ws = new WebSocket(`${app.ws}/ws/batch/${id}?api_key=${BOB}`)
      ws.on('error', () => {})
      ws.once('close', (code, reason) => resolve(`${code} ${String(reason)}`))
    }),
    jobs: async (id) => {
      jobs.send(JSON.stringify({ action: 'subscribe', job_id: id }))
      for (;;) {
        if (jobs.readyState !== WebSocket.OPEN) throw new Error('the jobs socket was closed')
        const i = replies.findIndex(m => m.job_id === id)
        if (i >= 0) return String(replies.splice(i, 1)[0].message).replace(id, '<id>')
        await new Promise(resolve => setImmediate(resolve))
      }
    },
    sse: http('GET', id => `/batch/${id}/events`),
    status: http('GET', id => `/batch/${id}/status`),
    result: http('GET', id => `/batch/${id}/result`),
    logs: http('GET', id => `/batch/${id}/logs`),
    outputs: http('GET', id => `/batch/${id}/outputs/report.csv`),
    cancel: http('POST', id => `/batch/${id}/cancel`),
    delete: http('DELETE', id => `/batch/${id}`)
  }

  /** What one call sends Redis, command names as MONITOR saw them (what follows a close included). */
  const commandsOf = async (call: () => Promise<string>): Promise<{ reply: string, commands: string[] }> => {
    await sleep(100)
    const from = log.length
    const reply = await call()
    // What follows a close (the unsubscribe, the connection's slot given back) is counted too.
    await sleep(250)
    return { reply, commands: log.slice(from) }
  }

  for (const [name, route] of Object.entries(routes)) {
    // Once each first, so a script loaded on first use is not counted for one side only.
    await route(theirs)
    await route(randomUUID())
    const foreign = await commandsOf(async () => await route(theirs))
    const unknown = await commandsOf(async () => await route(randomUUID()))
    t.equal(foreign.reply, unknown.reply, `${name}: the same reply (${unknown.reply.slice(0, 60)})`)
    // As a multiset: two connections (commands, subscriber) may interleave either way.
    t.same([...foreign.commands].sort(), [...unknown.commands].sort(), `${name}: the same ${unknown.commands.length} Redis commands (${unknown.commands.join(' ')})`)
  }

  const median = (xs: number[]): number => {
    const s = [...xs].sort((a, b) => a - b)
    return (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2
  }
  const timed = async (call: () => Promise<string>): Promise<number> => {
    const start = process.hrtime.bigint()
    await call()
    return Number(process.hrtime.bigint() - start) / 1000
  }
  for (const name of ['per-job socket', 'jobs', 'sse', 'status', 'result', 'logs', 'outputs']) {
    const route = routes[name]
    let last = ''
    let ok = false
    for (let attempt = 1; attempt <= 3 && !ok; attempt++) {
      const foreign: number[] = []
      const unknown: number[] = []
      for (let i = 0; i < 400; i++) {
        // Interleaved, each side first in turn: drift in the machine's load falls on both.
        if (i % 2 === 0) {
          foreign.push(await timed(async () => await route(theirs)))
          unknown.push(await timed(async () => await route(randomUUID())))
        } else {
          unknown.push(await timed(async () => await route(randomUUID())))
          foreign.push(await timed(async () => await route(theirs)))
        }
      }
      const f = median(foreign)
      const u = median(unknown)
      const spread = Math.abs(f - u) / Math.min(f, u)
      last = `medians foreign ${f.toFixed(0)} µs, unknown ${u.toFixed(0)} µs (${(spread * 100).toFixed(1)} %, try ${attempt})`
      ok = spread <= 0.10
    }
    t.ok(ok, `${name}: ${last}`)
  }
})
