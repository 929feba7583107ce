/**
 * Open sockets on ONE instance (or I, `--instances`, on one Redis): N WebSocket connections (default
 * 19,500 per instance, what the machine's 20,000 open files per process allow a server), opened
 * from C client processes (default 4, or one per 10,000 sockets)
 * over A loopback source addresses (127.0.0.2 ..., default 4), each socket watching its own job on
 * the `jobs` protocol with the plugin's defaults (pings and heartbeats every 30 s). The floors in
 * the same run, with as many sockets: a bare `ws` server (no pings, no heartbeats, no Redis), and
 * `ws+ping`, the same server pinging every socket and sending it a small heartbeat message every
 * 30 s, one write per socket and period, spread over the period (what any server with end-to-end
 * liveness pays at least).
 *
 * Per system: the server's RSS per socket (after a full GC, before and after the sockets
 * opened), its CPU while every socket is open and idle (over `--idle` seconds, at least one
 * ping and heartbeat period), that CPU projected to 100,000 sockets (what the sockets add,
 * scaled, over the server's own CPU measured for up to 10 s before they opened), and, for the plugin,
 * `--rate` progress reports per second (default 10,000, spread over the jobs) for `--load`
 * seconds: messages delivered per second and their latency from the report (p50, p99). Each
 * figure says the load average of the machine when it was taken.
 *
 *   npx tsx bench/sockets.ts [--instances 1] [--sockets 19500] [--clients 4] [--addresses 4] [--idle 60] [--rate 10000] [--load 10]
 *     [--systems plugin,ws,ws+ping] [--snapshots <dir>] [--profile <dir>]
 *
 * `BENCH_CANDIDATE=<path to a copy of lib/index.ts>` adds that copy as another system.
 * `--snapshots <dir>` writes each server's heap snapshot before and after its sockets opened
 * (`<system>-before.heapsnapshot`, `-after`), for bench/heap-diff.ts.
 * `--profile <dir>` records each server's CPU profile over the idle sockets and over the load
 * (`<system>-idle.cpuprofile`, `-load`), for bench/profile.ts.
 */
import { Queue, type Job } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import WebSocket from 'ws'
import { Child, killAll } from './lib/proc'
import { nowMs, serve } from './lib/ipc'
import { BenchRedis } from './lib/redis'
import { percentiles } from './lib/stats'

const arg = (name: string, fallback: string): string => {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 ? process.argv[i + 1] : fallback
}

type System = 'plugin' | 'ws' | 'ws+ping' | 'candidate'
/** The plugin's default ping and heartbeat period, which the `ws+ping` floor uses too. */
const LIVENESS_MS = 30_000
const OWNER = 'bench'
/** Progress reports carry their send time as `processed`, in ms after this base, over this total. */
const TOTAL = 1e9

interface OpenArgs { system: System, ports: number[], jobs: string[], addresses: string[], base: number }

/** A client process: holds its share of the sockets, and records report latencies when asked. */
function client (): void {
  let sockets: WebSocket[] = []
  let recording = false
  let latencies: number[] = []
  let base = 0
  serve({
    open: async ({ system, ports, jobs, addresses, base: b }: OpenArgs): Promise<{ opened: number, failed: number }> => {
      base = b
      let failed = 0
      // A few hundred handshakes at a time per client process: the server's accept queue is not what is measured.
      for (let i = 0; i < jobs.length; i += 250) {
        await Promise.all(jobs.slice(i, i + 250).map(async (jobId, j) => {
          const path = system.startsWith('ws') ? '/' : '/ws/jobs'
          const ws = new WebSocket(`ws://127.0.0.1:${ports[(i + j) % ports.length]}${path}`, { headers: { 'x-owner': OWNER }, localAddress: addresses[(i + j) % addresses.length] })
          let subscribed = false
          await new Promise<void>(resolve => {
            ws.on('error', () => { failed++; resolve() })
            ws.on('message', (data) => {
              const m = JSON.parse(String(data)) as { type?: string, processed?: number }
              // The floors answer the subscribe with a second `connected`: each socket has read
              // one message there too (ws keeps a little per socket once it has).
              if (m.type === 'connected') {
                if (system.startsWith('ws') && subscribed) resolve()
                else ws.send(JSON.stringify({ action: 'subscribe', job_id: jobId }))
                subscribed = true
              } else if (m.type === 'job_update') {
                resolve()
                if (recording && typeof m.processed === 'number' && m.processed > 0) latencies.push(nowMs() - base - m.processed)
              }
            })
          })
          sockets.push(ws)
        }))
      }
      return { opened: sockets.filter(s => s.readyState === WebSocket.OPEN).length, failed }
    },
    record: (on: boolean): Float64Array | null => {
      recording = on
      if (on) {
        latencies = []
        return null
      }
      return Float64Array.from(latencies)
    },
    close: async () => {
      for (const s of sockets) s.terminate()
      sockets = []
      await new Promise(resolve => setTimeout(resolve, 500))
    }
  })
}

const loadavg = (): string => readFileSync('/proc/loadavg', 'utf8').split(' ')[0]
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))

async function main (): Promise<void> {
  const INSTANCES = Number(arg('instances', '1'))
  const SOCKETS = Number(arg('sockets', String(19_500 * INSTANCES)))
  // A client process holds at most 19,500 sockets too (the same open-file limit).
  const CLIENTS = Number(arg('clients', String(Math.max(4, Math.ceil(SOCKETS / 10_000)))))
  const ADDRESSES = Array.from({ length: Number(arg('addresses', '4')) }, (_, i) => `127.0.0.${i + 2}`)
  const IDLE = Number(arg('idle', '60'))
  const BASE_IDLE = Math.min(10, IDLE)
  const RATE = Number(arg('rate', '10000'))
  const LOAD = Number(arg('load', '10'))
  const redis = await BenchRedis.start()
  process.on('exit', () => { killAll(); redis.kill() })
  process.on('SIGINT', () => process.exit(130))
  const queue = new Queue('sockets', { connection: { host: '127.0.0.1', port: redis.port } })
  const jobs: Job[] = []
  for (let i = 0; i < SOCKETS; i += 2000) {
    const chunk = Array.from({ length: Math.min(2000, SOCKETS - i) }, () => randomUUID())
    jobs.push(...await queue.addBulk(chunk.map(jobId => ({ name: 'sockets', data: { owner: OWNER }, opts: { jobId } }))))
  }
  const ids = jobs.map(j => j.id as string)
  process.stdout.write(`${SOCKETS} sockets on ${INSTANCES === 1 ? 'one instance' : `${INSTANCES} instances`}, each watching its own job; ${CLIENTS} client processes over ${ADDRESSES.length} source addresses (redis ${BenchRedis.version()}, ${process.env.BENCH_CANDIDATE === undefined ? '' : 'with a candidate, '}load average ${loadavg()})\n\n`)
  const config = JSON.stringify({ redisUrl: redis.url, queues: ['sockets'] })
  const clients = Array.from({ length: CLIENTS }, (_, i) => new Child('bench/sockets.ts', ['--client'], { label: `clients-${i}`, manyFiles: true }))
  await Promise.all(clients.map(async c => await c.ready))
  const candidate = process.env.BENCH_CANDIDATE
  const only = arg('systems', '').split(',').filter(s => s !== '')
  const systems = (['plugin', ...(candidate === undefined ? [] : ['candidate']), 'ws', 'ws+ping'] as System[])
    .filter(s => only.length === 0 || only.includes(s))
  const snapshots = arg('snapshots', '')
  const profile = arg('profile', '')
  process.stdout.write(`| system | opened | open time | RSS per socket | vs ws (vs ws+ping) | idle CPU, % of a core${INSTANCES === 1 ? '' : ` (${INSTANCES} instances)`} | projected at 100,000 per instance | vs ws+ping | delivered msgs/s (asked) | p50 / p99 | load average (open, idle, load) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n`)
  const perSocketOf = new Map<System, number>()
  const projectedOf = new Map<System, number>()
  const rows: Array<{ system: System, text: string }> = []
  for (const system of systems) {
    const bare = system.startsWith('ws')
    const servers = Array.from({ length: INSTANCES }, (_, i) => new Child(bare ? 'bench/servers/bare-ws.ts' : 'bench/servers/storm-plugin.ts', system === 'ws+ping' ? ['--liveness', String(LIVENESS_MS)] : [], {
      node: ['--expose-gc'], env: { BENCH_CONFIG: config, ...(system === 'candidate' ? { BENCH_LIB: candidate as string } : {}) }, label: `${system}-${i}`, manyFiles: true
    }))
    const ports = await Promise.all(servers.map(async s => (await s.ready as { port: number }).port))
    // Summed over the instances (there is one by default).
    const cpu = async (): Promise<number> => (await Promise.all(servers.map(async s => await s.call<number>('cpu')))).reduce((a, b) => a + b, 0)
    const rss = async (): Promise<number> => (await Promise.all(servers.map(async s => (await s.call<{ rss: number }>('memory')).rss))).reduce((a, b) => a + b, 0)
    const server = servers[0]
    // The server's own idle CPU without sockets (IPC, timers, Redis clients): the projection
    // scales only what the sockets add.
    // (After its start has settled: the first seconds compile and connect.)
    await sleep(3000)
    const cpuBase0 = await cpu()
    await sleep(BASE_IDLE * 1000)
    const idleBase = (await cpu() - cpuBase0) / BASE_IDLE * 100
    const before = await rss()
    if (snapshots !== '') await server.call('heapSnapshot', `${snapshots}/${system}-before.heapsnapshot`, 120_000)
    const base = nowMs()
    const loadOpen = loadavg()
    const started = nowMs()
    const opened = await Promise.all(clients.map(async (c, k) => await c.call<{ opened: number, failed: number }>('open', { system, ports, jobs: ids.filter((_, i) => i % CLIENTS === k), addresses: ADDRESSES, base }, 600_000)))
    const openMs = nowMs() - started
    const n = opened.reduce((s, o) => s + o.opened, 0)
    const after = await rss()
    const perSocket = (after - before) / n / 1024
    perSocketOf.set(system, perSocket)
    if (snapshots !== '') await server.call('heapSnapshot', `${snapshots}/${system}-after.heapsnapshot`, 120_000)
    await sleep(2000)
    const loadIdle = loadavg()
    if (profile !== '') await server.call('profileStart')
    const cpu0 = await cpu()
    await sleep(IDLE * 1000)
    const idle = (await cpu() - cpu0) / IDLE * 100
    if (profile !== '') await server.call('profileStop', `${profile}/${system}-idle.cpuprofile`)
    let delivered = '-'
    let latency = '-'
    let loadLoad = '-'
    if (!bare) {
      loadLoad = loadavg()
      await Promise.all(clients.map(async c => await c.call('record', true)))
      if (profile !== '') await server.call('profileStart')
      // RATE reports per second, in slices every 10 ms, over the jobs in turn; each carries its send time.
      const perSlice = RATE / 100
      let next = 0
      const end = nowMs() + LOAD * 1000
      let sent = 0
      while (nowMs() < end) {
        const slice = nowMs()
        for (let i = 0; i < perSlice; i++) {
          const job = jobs[next++ % jobs.length]
          sent++
          void job.updateProgress({ processed: Math.max(1, Math.round(nowMs() - base)), total: TOTAL }).catch(() => {})
        }
        await sleep(Math.max(0, 10 - (nowMs() - slice)))
      }
      await sleep(2000)
      if (profile !== '') await server.call('profileStop', `${profile}/${system}-load.cpuprofile`)
      const got = await Promise.all(clients.map(async c => await c.call<Float64Array>('record', false)))
      const p = percentiles(got)
      delivered = `${(p.n / LOAD).toFixed(0)} (${(sent / LOAD).toFixed(0)})`
      latency = `${p.p50.toFixed(0)} / ${p.p99.toFixed(0)} ms`
    }
    await Promise.all(clients.map(async c => await c.call('close')))
    await Promise.all(servers.map(async s => await s.stop()))
    // Per instance: its own idle CPU, and what 100,000 sockets on it would add.
    const projected = idleBase / INSTANCES + Math.max(0, idle - idleBase) * 100_000 / n
    projectedOf.set(system, projected)
    rows.push({ system, text: `| ${system} | ${n} (${opened.reduce((s, o) => s + o.failed, 0)} failed) | ${(openMs / 1000).toFixed(1)} s | ${perSocket.toFixed(2)} KiB | %MEMORY% | ${idle.toFixed(2)} (${idleBase.toFixed(2)} without sockets) | ${projected.toFixed(1)} % | %CPU% | ${delivered} | ${latency} | ${loadOpen}, ${loadIdle}, ${loadLoad} |` })
    process.stderr.write(`${rows[rows.length - 1].text.replace('%MEMORY%', '-').replace('%CPU%', '-')}\n`)
    await sleep(2000)
  }
  const ratio = (a: number | undefined, b: number | undefined): string => a === undefined || b === undefined ? '-' : `${(a / b).toFixed(2)} x`
  for (const { system, text } of rows) {
    const per = perSocketOf.get(system)
    const memory = `${ratio(per, perSocketOf.get('ws'))} (${ratio(per, perSocketOf.get('ws+ping'))})`
    process.stdout.write(`${text.replace('%MEMORY%', memory).replace('%CPU%', ratio(projectedOf.get(system), projectedOf.get('ws+ping')))}\n`)
  }
  await Promise.all(clients.map(async c => await c.stop()))
  await queue.close()
  await redis.stop()
}

if (process.argv.includes('--client')) client()
else {
  main().catch((err: Error) => {
    process.stderr.write(`${err.stack ?? err.message}\n`)
    process.exit(1)
  })
}
