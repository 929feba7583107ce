/**
 * Named streams against a floor, in one run:
 *
 * 1. Latency of a chunk from the writer's call to its receipt by a watcher, p50 and p99 (and the
 *    p99 of the write alone, from the call to Redis's reply: the writer's and Redis's share), at
 *    1,000 chunks/s on one job with one watcher, and at 100 jobs × 100 chunks/s with one watcher
 *    each (and 100 × 50, within the plugin's write capacity on a loaded 2-core machine). The
 *    plugin: `openJobStream(...).write(chunk)` (what `ctx.stream(name)` is), a plugin server
 *    process, watchers on the `jobs` protocol subscribed with `streams: { out: 0 }`. The floor:
 *    the writer XADDs each chunk to ONE Redis stream, a `ws` server process reads it with `XREAD
 *    BLOCK` and writes each entry straight to its job's sockets. Both writers await each
 *    chunk's write before the next of the same job (a worker's loop), jobs in parallel; a chunk
 *    carries its send time. Systems take turns in rounds (the order alternating); the figures are
 *    the medians of the rounds' p50 and p99, with server, writer and Redis CPU per 10,000 chunks.
 * 2. Write capacity: chunks per second 100 jobs store writing back-to-back (no watcher), with the
 *    writer's and Redis's CPU per chunk: the write path alone, which the latency depends on.
 * 3. Redis memory per 1 MB streamed: MEMORY USAGE of the keys holding the chunks and the
 *    used_memory delta, for 2 MB written in 64-byte and 1 KB chunks: the plugin's list (and its
 *    meta hash) against the floor's stream entries.
 *
 * Processes: a private redis-server, one server per system, one process for every watcher, and
 * this one as the writer. All share the machine: compare the rows of one run.
 *
 *   npx tsx bench/streams.ts [--quick] [--seconds=5] [--rounds=3] [--bytes=64]
 */
import { Redis } from 'ioredis'
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs'
import { availableParallelism, tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { openJobStream, type JobStream } from '../lib/index'
import { cpuSeconds, nowMs, serve } from './lib/ipc'
import { Child, killAll, procCpuSeconds } from './lib/proc'
import { BenchRedis } from './lib/redis'
import { fmt, percentiles, round, table } from './lib/stats'

const quick = process.argv.includes('--quick')
const arg = (name: string, dflt: number): number => Number(process.argv.find(a => a.startsWith(`--${name}=`))?.split('=')[1] ?? dflt)
const SECONDS = arg('seconds', quick ? 2 : 5)
const ROUNDS = arg('rounds', quick ? 2 : 3)
const BYTES = arg('bytes', 64)
const MEMORY_BYTES = 2 * 1024 * 1024
const OWNER = 'bench-owner'
const QUEUE = 'bench'
const FLOOR_KEY = 'floor:chunks'
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))
const loadavg = (): string => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')

type System = 'plugin' | 'floor'
const SYSTEMS: System[] = ['plugin', 'floor']

interface Workload { name: string, jobs: number, rate: number }
const WORKLOADS: Workload[] = [
  { name: '1 job × 1,000 chunks/s', jobs: 1, rate: 1000 },
  { name: '100 jobs × 100 chunks/s', jobs: 100, rate: 100 },
  // Half that: within the plugin's write capacity on a loaded machine, so what is left is delivery.
  { name: '100 jobs × 50 chunks/s', jobs: 100, rate: 50 }
]

/** What the watchers' process returns for a step. */
interface Received { n: number, p50: number, p99: number, max: number, missing: number, duplicates: number, outOfOrder: number, truncated: number }

// ---------------------------------------------------------------- the watchers' process

function watchers (): void {
  interface Watcher { ws: WebSocket, next: number, latency: number[], duplicates: number, outOfOrder: number, truncated: number }
  let open: Watcher[] = []
  let lastArrival = 0
  const onChunk = (w: Watcher, offset: number, chunk: string): void => {
    const now = nowMs()
    lastArrival = now
    if (offset < w.next) w.duplicates++
    else {
      if (offset > w.next) w.outOfOrder++
      w.next = offset + 1
    }
    w.latency.push(now - Number.parseFloat(chunk))
  }
  const connect = async (system: System, port: number, jobId: string): Promise<Watcher> => {
    const url = system === 'plugin' ? `ws://127.0.0.1:${port}/ws/jobs` : `ws://127.0.0.1:${port}/${jobId}`
    const ws = new WebSocket(url, { headers: { 'x-owner': OWNER } })
    const w: Watcher = { ws, next: 0, latency: [], duplicates: 0, outOfOrder: 0, truncated: 0 }
    ws.on('error', () => {})
    await new Promise<void>((resolve, reject) => {
      ws.once('close', () => reject(new Error(`${system}: socket closed before it was ready`)))
      ws.on('message', (data) => {
        const m = JSON.parse(String(data))
        if (system === 'floor') {
          if (m.ready === true) resolve()
          else onChunk(w, m.offset, m.chunk)
          return
        }
        if (m.type === 'stream') onChunk(w, m.offset, m.chunk)
        else if (m.type === 'stream_truncated') w.truncated++
        else if (m.type === 'connected') ws.send(JSON.stringify({ action: 'subscribe', job_id: jobId, streams: { out: 0 } }))
        else if (m.type === 'subscribed') resolve()
        else if (m.type === 'error') reject(new Error(`plugin: ${String(data)}`))
      })
    })
    return w
  }
  serve({
    open: async ({ system, port, jobs }: { system: System, port: number, jobs: string[] }) => {
      for (let i = 0; i < jobs.length; i += 20) open.push(...await Promise.all(jobs.slice(i, i + 20).map(async id => await connect(system, port, id))))
    },
    /** Waits until every watcher has `expected` chunks or none arrived for 1 s, then closes them. */
    collect: async ({ expected }: { expected: number }): Promise<Received> => {
      lastArrival = nowMs()
      while (open.some(w => w.next < expected) && nowMs() - lastArrival < 1000) await sleep(10)
      const stats = percentiles(open.map(w => Float64Array.from(w.latency)))
      const out: Received = {
        ...stats,
        missing: open.reduce((s, w) => s + Math.max(0, expected - w.latency.length + w.duplicates), 0),
        duplicates: open.reduce((s, w) => s + w.duplicates, 0),
        outOfOrder: open.reduce((s, w) => s + w.outOfOrder, 0),
        truncated: open.reduce((s, w) => s + w.truncated, 0)
      }
      for (const w of open) w.ws.terminate()
      open = []
      return out
    },
    cpu: () => cpuSeconds(),
    exit: () => { setTimeout(() => process.exit(0), 20) }
  })
}

// ---------------------------------------------------------------- the writer (this process)

/** `acked`: per chunk, ms from the call to its write's reply (the writer's and Redis's share of the latency). */
interface Writer { write: (job: number, chunk: string, sentAt: number) => void, idle: () => Promise<void>, acked: number[] }

function writer (system: System, redis: Redis, jobs: string[]): Writer {
  if (system === 'plugin') {
    const streams: JobStream[] = jobs.map(jobId => openJobStream(redis, { queue: QUEUE, jobId, name: 'out' }))
    const pending = new Set<Promise<unknown>>()
    const acked: number[] = []
    return {
      acked,
      // write() chains the chunks of one stream itself: each waits for the one before.
      write: (job, chunk, sentAt) => {
        const p = streams[job].write(chunk).then(() => { acked.push(nowMs() - sentAt) }, (err: Error) => { process.stderr.write(`plugin write: ${err.message}\n`) })
        pending.add(p)
        void p.finally(() => pending.delete(p))
      },
      idle: async () => { await Promise.all(pending) }
    }
  }
  const tails: Array<Promise<unknown>> = jobs.map(() => Promise.resolve())
  const offsets = jobs.map(() => 0)
  const acked: number[] = []
  return {
    acked,
    write: (job, chunk, sentAt) => {
      const offset = offsets[job]++
      tails[job] = tails[job].then(async () => await redis.xadd(FLOOR_KEY, '*', 'j', jobs[job], 'o', String(offset), 'c', JSON.stringify(chunk)))
        .then(() => { acked.push(nowMs() - sentAt) })
    },
    idle: async () => { await Promise.all(tails) }
  }
}

/** A chunk of BYTES characters that starts with its send time. */
function chunkAt (sentAt: number): string {
  const head = `${sentAt.toFixed(3)} `
  return head + 'x'.repeat(Math.max(0, BYTES - head.length))
}

/** Sends `rate` chunks per second on each job for `seconds`, the jobs' schedules staggered evenly. */
async function drive (w: Writer, jobs: number, rate: number, seconds: number): Promise<number> {
  const total = Math.round(rate * seconds)
  const sent = new Array<number>(jobs).fill(0)
  const started = performance.now()
  for (;;) {
    const elapsed = (performance.now() - started) / 1000
    let done = true
    for (let j = 0; j < jobs; j++) {
      const due = Math.min(total, Math.floor(elapsed * rate + j / jobs) + 1)
      while (sent[j] < due) {
        const sentAt = Number(nowMs().toFixed(3))
        w.write(j, chunkAt(sentAt), sentAt)
        sent[j]++
      }
      if (sent[j] < total) done = false
    }
    if (done) break
    await sleep(1)
  }
  await w.idle()
  return total
}

interface Round { system: System, workload: string, round: number, seconds: number, chunks: number, received: Received, write: { p50: number, p99: number }, serverCpuPer10k: number, writerCpuPer10k: number, redisCpuPer10k: number, commandsPerChunk: number }

async function main (): Promise<void> {
  const redis = await BenchRedis.start()
  const uploadDir = mkdtempSync(join(tmpdir(), 'jp-bench-streams-'))
  const cleanup = (): void => {
    killAll()
    redis.kill()
    rmSync(uploadDir, { recursive: true, force: true })
  }
  process.on('exit', cleanup)
  for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(130))

  const load0 = loadavg()
  process.stdout.write(`streams bench: redis ${BenchRedis.version()}, node ${process.version}, ${availableParallelism()} cores, ${SECONDS} s per step, ${ROUNDS} rounds, ${BYTES}-byte chunks${quick ? ', quick' : ''}; load average ${load0}\n`)
  const config = (system: System): Record<string, string> => ({ BENCH_CONFIG: JSON.stringify({ system, redisUrl: redis.url, queue: QUEUE, uploadDir, floorKey: FLOOR_KEY }) })
  const servers: Record<System, Child> = {
    plugin: new Child('bench/servers/streams.ts', [], { label: 'plugin', env: config('plugin') }),
    floor: new Child('bench/servers/streams.ts', [], { label: 'floor', env: config('floor') })
  }
  const clients = new Child('bench/streams.ts', ['--watchers'], { label: 'watchers' })
  const ports = { plugin: (await servers.plugin.ready).port as number, floor: (await servers.floor.ready).port as number }
  await clients.ready
  const w = new Redis(redis.url)

  const step = async (system: System, load: Workload, seconds: number): Promise<Omit<Round, 'round'>> => {
    const jobs = system === 'plugin'
      ? await servers.plugin.call<string[]>('enqueue', { n: load.jobs, owner: OWNER })
      : Array.from({ length: load.jobs }, (_, i) => `floor-${Date.now()}-${i}`)
    await clients.call('open', { system, port: ports[system], jobs })
    const server0 = procCpuSeconds(servers[system].pid)
    const writer0 = cpuSeconds()
    const redis0 = await redis.snapshot()
    const t0 = performance.now()
    const wr = writer(system, w, jobs)
    const perJob = await drive(wr, load.jobs, load.rate, seconds)
    const ack = percentiles([Float64Array.from(wr.acked)])
    const received = await clients.call<Received>('collect', { expected: perJob })
    const elapsed = (performance.now() - t0) / 1000
    const redis1 = await redis.snapshot()
    const chunks = perJob * load.jobs
    const per10k = (x: number): number => x / chunks * 10_000
    const delta = { cpu: redis1.cpu - redis0.cpu, commands: Object.entries(redis1.commands).reduce((s, [k, v]) => s + v - (redis0.commands[k] ?? 0), 0) }
    return {
      system,
      workload: load.name,
      seconds: round(elapsed, 2),
      chunks,
      received,
      write: { p50: round(ack.p50, 3), p99: round(ack.p99, 3) },
      serverCpuPer10k: round(per10k(procCpuSeconds(servers[system].pid) - server0), 3),
      writerCpuPer10k: round(per10k(cpuSeconds() - writer0), 3),
      redisCpuPer10k: round(per10k(delta.cpu), 3),
      commandsPerChunk: round(delta.commands / chunks, 2)
    }
  }

  const rounds: Round[] = []
  try {
    for (const load of WORKLOADS) {
      // Unmeasured first, so that no system's first round carries its compiling.
      for (const system of SYSTEMS) await step(system, load, quick ? 0.5 : 1)
      for (let r = 0; r < ROUNDS; r++) {
        const order = r % 2 === 0 ? SYSTEMS : [...SYSTEMS].reverse()
        for (const system of order) {
          const s = { ...await step(system, load, SECONDS), round: r }
          rounds.push(s)
          const x = s.received
          process.stdout.write(`  ${load.name} round ${r + 1} ${system}: p50 ${fmt(x.p50, 2)} ms, p99 ${fmt(x.p99, 2)} ms, max ${fmt(x.max, 1)} ms (write p99 ${fmt(s.write.p99, 2)} ms), ${x.n}/${s.chunks} chunks` +
            `${x.missing + x.duplicates + x.outOfOrder + x.truncated > 0 ? `, missing ${x.missing}, duplicates ${x.duplicates}, out of order ${x.outOfOrder}, truncated ${x.truncated}` : ''}; load ${loadavg()}\n`)
        }
      }
    }

    const median = (xs: number[]): number => { const s = [...xs].sort((a, b) => a - b); return s.length === 0 ? NaN : s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2 }
    const summary = WORKLOADS.map(load => {
      const of = (system: System): Round[] => rounds.filter(r => r.workload === load.name && r.system === system)
      const pick = (system: System, f: (r: Round) => number): number => round(median(of(system).map(f)), 3)
      const bySystem = Object.fromEntries(SYSTEMS.map(system => [system, {
        p50: pick(system, r => r.received.p50),
        p99: pick(system, r => r.received.p99),
        writeP99: pick(system, r => r.write.p99),
        max: round(Math.max(...of(system).map(r => r.received.max)), 1),
        lost: of(system).reduce((s, r) => s + r.received.missing + r.received.duplicates + r.received.outOfOrder + r.received.truncated, 0),
        serverCpuPer10k: pick(system, r => r.serverCpuPer10k),
        writerCpuPer10k: pick(system, r => r.writerCpuPer10k),
        redisCpuPer10k: pick(system, r => r.redisCpuPer10k),
        commandsPerChunk: pick(system, r => r.commandsPerChunk)
      }])) as Record<System, { p50: number, p99: number, writeP99: number, max: number, lost: number, serverCpuPer10k: number, writerCpuPer10k: number, redisCpuPer10k: number, commandsPerChunk: number }>
      return { workload: load.name, jobs: load.jobs, ratePerJob: load.rate, ...bySystem, ratio: { p50: round(bySystem.plugin.p50 / bySystem.floor.p50, 2), p99: round(bySystem.plugin.p99 / bySystem.floor.p99, 2), serverCpu: round(bySystem.plugin.serverCpuPer10k / bySystem.floor.serverCpuPer10k, 2) } }
    })
    const rows = summary.flatMap(s => SYSTEMS.map(system => {
      const x = s[system]
      return [system === 'plugin' ? s.workload : '', system, fmt(x.p50, 2), fmt(x.p99, 2), fmt(x.max, 1), fmt(x.writeP99, 2), x.lost, fmt(x.serverCpuPer10k, 2), fmt(x.writerCpuPer10k, 2), fmt(x.redisCpuPer10k, 2), fmt(x.commandsPerChunk, 1),
        system === 'plugin' ? `${fmt(s.ratio.p50, 2)} / ${fmt(s.ratio.p99, 2)}` : '']
    }))
    process.stdout.write(table(`Chunk latency, writer's call to receipt (median of ${ROUNDS} rounds; CPU seconds per 10,000 chunks)`,
      ['workload', 'system', 'p50 ms', 'p99 ms', 'max ms', 'write p99', 'lost', 'server CPU', 'writer CPU', 'Redis CPU', 'cmds/chunk', 'plugin/floor p50 / p99'], rows) + '\n')

    // The write path alone: how many chunks per second 100 jobs store writing back-to-back.
    const capacity: Array<{ system: System, round: number, chunksPerSecond: number, writerCpuPerChunkUs: number, redisCpuPerChunkUs: number }> = []
    for (let r = 0; r < 2; r++) {
      for (const system of r % 2 === 0 ? SYSTEMS : [...SYSTEMS].reverse()) {
        const jobs = system === 'plugin' ? await servers.plugin.call<string[]>('enqueue', { n: 100, owner: OWNER }) : Array.from({ length: 100 }, (_, i) => `cap-${r}-${i}`)
        const c0 = cpuSeconds()
        const r0 = await redis.snapshot()
        const n = await backToBack(system, w, jobs, quick ? 1 : 3)
        const r1 = await redis.snapshot()
        capacity.push({ system, round: r, chunksPerSecond: Math.round(n / (quick ? 1 : 3)), writerCpuPerChunkUs: round((cpuSeconds() - c0) / n * 1e6, 1), redisCpuPerChunkUs: round((r1.cpu - r0.cpu) / n * 1e6, 1) })
      }
    }
    const best = (system: System): typeof capacity[number] => capacity.filter(c => c.system === system).sort((a, b) => b.chunksPerSecond - a.chunksPerSecond)[0]
    process.stdout.write(table(`Write capacity: 100 jobs writing back-to-back for ${quick ? 1 : 3} s, no watcher (best of 2 rounds)`, ['system', 'chunks/s', 'writer CPU µs/chunk', 'Redis CPU µs/chunk', 'plugin/floor'],
      SYSTEMS.map(system => [system, best(system).chunksPerSecond, fmt(best(system).writerCpuPerChunkUs, 1), fmt(best(system).redisCpuPerChunkUs, 1), system === 'plugin' ? fmt(best('plugin').chunksPerSecond / best('floor').chunksPerSecond, 2) : ''])) + '\n')

    const memory = await memoryPerMB(redis, servers.plugin, w)
    process.stdout.write(table(`Redis memory per 1 MB of chunks (${MEMORY_BYTES / 1024 / 1024} MB written; MEMORY USAGE of the keys, used_memory delta)`,
      ['chunk', 'system', 'chunks', 'keys B/MB', 'used_memory B/MB', 'ratio (keys)'],
      memory.flatMap(m => SYSTEMS.map(system => [system === 'plugin' ? `${m.chunkBytes} B` : '', system, m.chunks, fmt(m[system].keysPerMB, 0), fmt(m[system].usedPerMB, 0), system === 'plugin' ? fmt(m.ratio, 2) : '']))) + '\n')
    const load1 = loadavg()
    process.stdout.write(`load average at the end: ${load1}\n`)
    writeFileSync(join(__dirname, 'results', 'streams.json'), JSON.stringify({
      date: new Date().toISOString(),
      node: process.version,
      redis: BenchRedis.version(),
      cores: availableParallelism(),
      loadavg: { start: load0, end: load1 },
      config: { seconds: SECONDS, rounds: ROUNDS, chunkBytes: BYTES, quick },
      latency: summary,
      capacity,
      memory,
      rounds
    }, null, 2) + '\n')
  } finally {
    w.disconnect()
    await Promise.all([...Object.values(servers), clients].map(async c => await c.stop()))
    await redis.stop()
  }
}

/** Chunks stored in `seconds` by one loop per job, each awaiting its write before the next. */
async function backToBack (system: System, redis: Redis, jobs: string[], seconds: number): Promise<number> {
  const end = performance.now() + seconds * 1000
  const counts = await Promise.all(jobs.map(async (jobId) => {
    const stream = system === 'plugin' ? openJobStream(redis, { queue: QUEUE, jobId, name: 'cap' }) : null
    let n = 0
    while (performance.now() < end) {
      const chunk = chunkAt(nowMs())
      if (stream !== null) await stream.write(chunk)
      else await redis.xadd(FLOOR_KEY, '*', 'j', jobId, 'o', String(n), 'c', JSON.stringify(chunk))
      n++
    }
    return n
  }))
  return counts.reduce((a, b) => a + b, 0)
}

interface MemoryRow { chunkBytes: number, chunks: number, payload: number, plugin: { keys: number, used: number, keysPerMB: number, usedPerMB: number }, floor: { keys: number, used: number, keysPerMB: number, usedPerMB: number }, ratio: number }

async function usedMemory (r: Redis): Promise<number> {
  return Number(/used_memory:(\d+)/.exec(await r.info('memory'))?.[1])
}

/** MEMORY USAGE of what holds 2 MB of chunks, and the used_memory delta, for both systems. */
async function memoryPerMB (redis: BenchRedis, plugin: Child, w: Redis): Promise<MemoryRow[]> {
  const out: MemoryRow[] = []
  for (const chunkBytes of [64, 1024]) {
    const chunks = Math.ceil(MEMORY_BYTES / chunkBytes)
    const chunk = (i: number): string => `${i} `.padEnd(chunkBytes, 'x')
    const payload = chunks * chunkBytes
    const perMB = (x: number): number => x / payload * 1024 * 1024

    const [jobId] = await plugin.call<string[]>('enqueue', { n: 1, owner: OWNER })
    const stream = openJobStream(w, { queue: QUEUE, jobId, name: 'mem' })
    const used0 = await usedMemory(redis.info)
    // pipe(): in order, in batches, slowed when 1 MiB waits (unawaited writes past it are refused).
    await stream.pipe((async function * () { for (let i = 0; i < chunks; i++) yield chunk(i) })())
    await stream.end()
    const used1 = await usedMemory(redis.info)
    const keys = await w.keys(`bull:${QUEUE}:${jobId}:jp-stream:mem*`)
    let pluginKeys = 0
    for (const key of keys) pluginKeys += Number(await w.call('MEMORY', 'USAGE', key, 'SAMPLES', '0'))

    const floorKey = `floor:mem:${chunkBytes}`
    const floorUsed0 = await usedMemory(redis.info)
    for (let i = 0; i < chunks; i += 1000) {
      const batch = w.pipeline()
      for (let j = i; j < Math.min(chunks, i + 1000); j++) batch.xadd(floorKey, '*', 'j', jobId, 'o', String(j), 'c', JSON.stringify(chunk(j)))
      await batch.exec()
    }
    const floorUsed1 = await usedMemory(redis.info)
    const floorKeys = Number(await w.call('MEMORY', 'USAGE', floorKey, 'SAMPLES', '0'))
    out.push({
      chunkBytes,
      chunks,
      payload,
      plugin: { keys: pluginKeys, used: used1 - used0, keysPerMB: Math.round(perMB(pluginKeys)), usedPerMB: Math.round(perMB(used1 - used0)) },
      floor: { keys: floorKeys, used: floorUsed1 - floorUsed0, keysPerMB: Math.round(perMB(floorKeys)), usedPerMB: Math.round(perMB(floorUsed1 - floorUsed0)) },
      ratio: round(pluginKeys / floorKeys, 2)
    })
  }
  return out
}

if (process.argv.includes('--watchers')) {
  watchers()
} else {
  main().catch((err) => {
    process.stderr.write(`${(err as Error).stack ?? String(err)}\n`)
    process.exitCode = 1
  })
}
