/**
 * Subscribe storm across instances: J watched jobs (default 100,000, waiting in one queue), I
 * instances (default 4) of each system on one Redis, S sockets (default 1,000, spread evenly over
 * the instances and over C client processes) opened at once, each subscribing P jobs (default
 * 100) as soon as it may. The plugin runs the `jobs` protocol with K kinds (default 2: the bare
 * job id is looked for in each); the peer is Socket.IO with its Redis adapter, each subscription
 * an owner read then a room join, acknowledged. Both systems are up in the same run and take
 * turns, the order rotating each round. The floor (bench/servers/storm-floor.ts) is the least any
 * design with a channel per job pays: one SUBSCRIBE per turn, then an owner read per job, on a bare
 * `ws` server. `BENCH_CANDIDATE=<path to a copy of lib/index.ts>` adds
 * that copy as a third system.
 *
 * Per system and round: the time from the storm's start until every subscription had its first
 * message (a `job_update` on the plugin, the acknowledgement on Socket.IO), the per-subscription
 * p50/p99 from the storm's start and from the subscribe's send, the RSS of each instance before
 * and after the storm and its JS heap used after (sockets still open, after a full GC), Redis
 * commands per subscription, the load average of the machine before the round, the CPU the
 * instances and Redis spent on it. With `--profile`, a CPU profile of instance 0 of each system
 * per measured storm (summarise it with `npx tsx bench/profile.ts <file>`).
 *
 *   npx tsx bench/storm.ts [--jobs 100000] [--instances 4] [--sockets 1000] [--per-socket 100] [--kinds 2] [--clients 2] [--rounds 2] [--systems plugin,socket.io,floor] [--profile]
 */
import { Queue } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { io as sioClient, type Socket } from 'socket.io-client'
import { Child, killAll } from './lib/proc'
import { nowMs, serve } from './lib/ipc'
import { BenchRedis, redisDelta } from './lib/redis'
import { percentiles } from './lib/stats'

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : fallback
}

type System = 'plugin' | 'socket.io' | 'floor' | 'candidate'
const OWNER = 'bench'

interface StormArgs { system: System, ports: number[], jobs: string[][], t0: number, timeoutMs: number }
interface StormResult { fromStart: Float64Array, fromSend: Float64Array, missing: number, closed: string[] }

/** A client process: opens its sockets at `t0`, subscribes each one's jobs, records each first message. */
function client (): void {
  let open: Array<WebSocket | Socket> = []
  serve({
    storm: async ({ system, ports, jobs, t0, timeoutMs }: StormArgs): Promise<StormResult> => {
      const total = jobs.reduce((s, j) => s + j.length, 0)
      const fromStart = new Float64Array(total)
      const fromSend = new Float64Array(total)
      let n = 0
      const closed: string[] = []
      let done!: () => void
      const all = new Promise<void>(resolve => { done = resolve })
      const got = (sent: number): void => {
        const now = nowMs()
        fromStart[n] = now - t0
        fromSend[n] = now - sent
        if (++n === total) done()
      }
      await new Promise(resolve => setTimeout(resolve, Math.max(0, t0 - nowMs())))
      jobs.forEach((mine, s) => {
        const port = ports[s % ports.length]
        if (system !== 'socket.io') {
          const ws = new WebSocket(`ws://127.0.0.1:${port}/ws/jobs`, { headers: { 'x-owner': OWNER } })
          open.push(ws)
          const waiting = new Set(mine)
          let sent = 0
          ws.on('message', (data) => {
            const m = JSON.parse(String(data)) as { type?: string, job_id?: string }
            // Subscribes go out once the server said `connected`, as the client library does.
            if (m.type === 'connected') {
              sent = nowMs()
              for (const id of mine) ws.send(JSON.stringify({ action: 'subscribe', job_id: id }))
            } else if (m.type === 'job_update' && m.job_id !== undefined && waiting.delete(m.job_id)) got(sent)
          })
          ws.on('error', () => {})
          ws.on('close', (code, reason) => { if (waiting.size > 0) closed.push(`${code} ${String(reason)}`) })
        } else {
          const c = sioClient(`http://127.0.0.1:${port}`, { transports: ['websocket'], forceNew: true, reconnection: false, query: { owner: OWNER } })
          open.push(c)
          c.on('connect', () => {
            const sent = nowMs()
            for (const id of mine) c.emit('subscribe', id, () => got(sent))
          })
        }
      })
      await Promise.race([all, new Promise(resolve => setTimeout(resolve, timeoutMs))])
      return { fromStart: fromStart.subarray(0, n), fromSend: fromSend.subarray(0, n), missing: total - n, closed: closed.slice(0, 5) }
    },
    close: async () => {
      for (const s of open) {
        if (s instanceof WebSocket) s.terminate()
        else s.disconnect()
      }
      open = []
      await new Promise(resolve => setTimeout(resolve, 200))
    }
  })
}

const loadavg = (): string => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')

async function main (): Promise<void> {
  const JOBS = Number(arg('jobs', '100000'))
  const INSTANCES = Number(arg('instances', '4'))
  const SOCKETS = Number(arg('sockets', '1000'))
  const PER_SOCKET = Number(arg('per-socket', '100'))
  const KINDS = Number(arg('kinds', '2'))
  const CLIENTS = Number(arg('clients', '2'))
  const ROUNDS = Number(arg('rounds', '2'))
  const PROFILE = process.argv.includes('--profile')
  let profiles = 0
  const redis = await BenchRedis.start()
  process.on('exit', () => { killAll(); redis.kill() })
  process.on('SIGINT', () => process.exit(130))
  const queues = Array.from({ length: KINDS }, (_, i) => i === 0 ? 'storm' : `storm-other${i}`)
  const queue = new Queue(queues[0], { connection: { host: '127.0.0.1', port: redis.port } })
  const ids: string[] = []
  for (let i = 0; i < JOBS; i += 2000) {
    const chunk = Array.from({ length: Math.min(2000, JOBS - i) }, () => randomUUID())
    ids.push(...chunk)
    await queue.addBulk(chunk.map(jobId => ({ name: 'storm', data: { owner: OWNER }, opts: { jobId } })))
  }
  await queue.close()
  process.stdout.write(`${JOBS} waiting jobs, ${INSTANCES} instances per system, ${SOCKETS} sockets x ${PER_SOCKET} subscriptions, ${KINDS} kinds on the plugin, ${CLIENTS} client processes (redis ${BenchRedis.version()})\n`)

  const config = JSON.stringify({ redisUrl: redis.url, queues })
  const start = (script: string, label: string, env: Record<string, string> = {}): Child => new Child(script, [], { node: ['--expose-gc'], env: { BENCH_CONFIG: config, ...env }, label, manyFiles: true })
  // BENCH_CANDIDATE: another copy of lib/index.ts, as a third system in the same run.
  const candidate = process.env.BENCH_CANDIDATE
  const systems = arg('systems', 'plugin,socket.io,floor').split(',') as System[]
  if (candidate !== undefined) systems.push('candidate')
  const servers: Partial<Record<System, Child[]>> = {}
  const ports: Partial<Record<System, number[]>> = {}
  for (const system of systems) {
    const script = system === 'socket.io' ? 'bench/servers/storm-sio.ts' : system === 'floor' ? 'bench/servers/storm-floor.ts' : 'bench/servers/storm-plugin.ts'
    servers[system] = Array.from({ length: INSTANCES }, (_, i) => start(script, `${system}-${i}`, system === 'candidate' ? { BENCH_LIB: candidate as string } : {}))
  }
  for (const system of systems) ports[system] = (await Promise.all((servers[system] as Child[]).map(async s => await s.ready))).map((r: { port: number }) => r.port)
  const clients = Array.from({ length: CLIENTS }, (_, i) => new Child('bench/storm.ts', ['--client'], { label: `clients-${i}`, manyFiles: true }))
  await Promise.all(clients.map(async c => await c.ready))

  /** One storm: returns the merged latencies, the instances' RSS after it, and Redis commands per subscription. */
  const storm = async (system: System, jobs: string[], sockets: number): Promise<{ all: number, fromStart: ReturnType<typeof percentiles>, fromSend: ReturnType<typeof percentiles>, missing: number, rssBefore: number[], rss: number[], heap: number[], commands: number, byCommand: string, load: string, cpu: number, redisCpu: number }> => {
    const load = loadavg()
    const rssBefore = await Promise.all((servers[system] as Child[]).map(async s => (await s.call<{ rss: number }>('memory')).rss / 2 ** 20))
    const perSocket = Array.from({ length: sockets }, (_, s) => jobs.slice(s * PER_SOCKET, (s + 1) * PER_SOCKET))
    const before = await redis.snapshot()
    const cpuBefore = await Promise.all((servers[system] as Child[]).map(async s => await s.call<number>('cpu')))
    const profile = PROFILE && sockets === SOCKETS ? join(tmpdir(), `storm-${system}-${process.pid}-${profiles++}.cpuprofile`) : null
    if (profile !== null) await (servers[system] as Child[])[0].call('profileStart')
    const t0 = nowMs() + 300
    // Socket s goes to instance s % I and client process s % C.
    const results = await Promise.all(clients.map(async (c, k) => {
      const mine = perSocket.filter((_, s) => s % CLIENTS === k)
      const instanceOf = perSocket.map((_, s) => s % INSTANCES).filter((_, s) => s % CLIENTS === k)
      return await c.call<StormResult>('storm', { system, ports: instanceOf.map(i => (ports[system] as number[])[i]), jobs: mine, t0, timeoutMs: 60_000 }, 90_000)
    }))
    const d = redisDelta(before, await redis.snapshot())
    const cpu = (await Promise.all((servers[system] as Child[]).map(async (s, i) => await s.call<number>('cpu') - cpuBefore[i]))).reduce((a, b) => a + b, 0)
    if (profile !== null) {
      await (servers[system] as Child[])[0].call('profileStop', profile)
      process.stderr.write(`${system}: profile of instance 0 in ${profile}\n`)
    }
    const after = await Promise.all((servers[system] as Child[]).map(async s => await s.call<{ rss: number, heapUsed: number }>('memory')))
    const rss = after.map(m => m.rss / 2 ** 20)
    const heap = after.map(m => m.heapUsed / 2 ** 20)
    await Promise.all(clients.map(async c => await c.call('close')))
    const n = jobs.length
    const byCommand = Object.entries(d.byCommand).sort((a, b) => b[1] - a[1]).slice(0, 6).map(([k, v]) => `${k} ${(v / n).toFixed(3)}`).join(', ')
    for (const r of results) if (r.closed.length > 0) process.stderr.write(`${system}: sockets closed early: ${r.closed.join('; ')}\n`)
    const fromStart = percentiles(results.map(r => r.fromStart))
    return { all: fromStart.max, fromStart, fromSend: percentiles(results.map(r => r.fromSend)), missing: results.reduce((s, r) => s + r.missing, 0), rssBefore, rss, heap, commands: d.commands / n, byCommand, load, cpu, redisCpu: d.cpu }
  }

  // Not measured: each system's code compiles on a small storm first.
  for (const system of systems) {
    await storm(system, ids.slice(-20 * PER_SOCKET), 20)
    await new Promise(resolve => setTimeout(resolve, 1000))
  }
  const jobs = ids.slice(0, SOCKETS * PER_SOCKET)
  process.stdout.write('\n| round | system | all first messages | p50 / p99 from the start | p50 / p99 from the send | missing | RSS per instance before / after (MB) | JS heap used after (MB) | server CPU s (all instances) | Redis CPU s | Redis commands per subscription | load average before |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n')
  for (let round = 0; round < ROUNDS; round++) {
    const order = systems.map((_, i) => systems[(i + round) % systems.length])
    for (const system of order) {
      const r = await storm(system, jobs, SOCKETS)
      const s = (ms: number): string => (ms / 1000).toFixed(2)
      process.stdout.write(`| ${round + 1} | ${system} | ${s(r.all)} s | ${s(r.fromStart.p50)} / ${s(r.fromStart.p99)} s | ${s(r.fromSend.p50)} / ${s(r.fromSend.p99)} s | ${r.missing} | ${r.rssBefore.map(x => x.toFixed(0)).join(', ')} / ${r.rss.map(x => x.toFixed(0)).join(', ')} | ${r.heap.map(x => x.toFixed(0)).join(', ')} | ${r.cpu.toFixed(2)} | ${r.redisCpu.toFixed(2)} | ${r.commands.toFixed(3)} (${r.byCommand}) | ${r.load} |\n`)
      // Unsubscribes and closes settle before the next system's turn.
      await new Promise(resolve => setTimeout(resolve, 3000))
    }
  }
  await Promise.all([...clients, ...systems.flatMap(s => servers[s] as Child[])].map(async c => await c.stop()))
  await redis.stop()
}

if (process.argv.includes('--client')) client()
else {
  main().catch((err: Error) => {
    process.stderr.write(`${err.stack ?? err.message}\n`)
    process.exit(1)
  })
}
