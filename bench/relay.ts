import { Redis } from 'ioredis'
import { join } from 'node:path'
import { Child, killAll, ROOT } from './lib/proc'
import { BenchRedis } from './lib/redis'
import { cpuSeconds, serve } from './lib/ipc'
import { fmt, percentiles, table } from './lib/stats'

/**
 * The relay path alone, between BullMQ's event stream and the hub: each instance's bridge reads
 * the stream, publishes to the jobs' channels and hands its own reads to its hub; every hub
 * subscribes to the watched jobs and takes the messages (one sink per job that counts what it
 * gets, no sockets). This process writes progress entries to the stream the way BullMQ does, at
 * a given rate, and reads each instance's CPU time, Redis' commands and CPU per 10,000 events,
 * and the time from an entry's write to its delivery to each hub's sink (p50, p99).
 * With BENCH_CANDIDATE=/path/to/lib/index.ts the same runs for that copy of lib/ too, the two
 * taking turns at every rate: a change to the path is measured against what it replaces.
 *
 * With --floor, one BullMQ QueueEvents per instance reads the same stream in turn with them: the
 * cost of reading BullMQ's stream directly, every instance reading every event.
 *
 *   npx tsx bench/relay.ts [--rates=500,2000,8000] [--seconds=3] [--instances=2] [--rounds=3] [--floor]
 */
const argv = process.argv.slice(2)
const opt = (name: string, fallback: string): string => argv.find(a => a.startsWith(`--${name}=`))?.slice(name.length + 3) ?? fallback
const JOBS = 50
const QUEUE = 'relay'
/** The `lib` of the QueueEvents floor (`--floor`). */
const FLOOR = 'floor'

interface Step { events: number, cpu: number[], delivered: number, commands: Record<string, number>, redisCpu: number, p50: number, p99: number }

/**
 * What a child counts (each delivery, and the time from an entry's write to its delivery, in ms:
 * the writer put its write time in the progress value's `data.s`) and serves to this process.
 */
class Counter {
  delivered = 0
  latencies: number[] = []

  add (s: unknown): void {
    this.delivered++
    if (typeof s === 'number') this.latencies.push(performance.timeOrigin + performance.now() - s)
  }

  /** Answers this process once the child is set up (serving tells it the child is ready). */
  serve (stop: () => Promise<void>): void {
    serve({
      cpu: () => cpuSeconds(),
      delivered: () => this.delivered,
      latencies: () => {
        const out = Float64Array.from(this.latencies)
        this.latencies = []
        return out
      },
      exit: async () => {
        await stop()
        setImmediate(() => process.exit(0))
      }
    })
  }
}

/**
 * The floor of the path: one BullMQ QueueEvents per instance, counting each progress event as
 * delivered. Every instance reads every event (what the floor's cost grows with), and nothing is
 * published, ordered or parsed beyond what QueueEvents does.
 */
async function floorChild (cfg: { port: number }): Promise<void> {
  const { QueueEvents } = await import('bullmq')
  const events = new QueueEvents(QUEUE, { connection: { host: '127.0.0.1', port: cfg.port }, lastEventId: '$' })
  events.on('error', () => {})
  const counter = new Counter()
  events.on('progress', ({ data }) => counter.add((data as { data?: { s?: unknown } } | undefined)?.data?.s))
  await events.waitUntilReady()
  counter.serve(async () => await events.close())
}

async function child (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { port: number, lib: string, jobs: string[] }
  if (cfg.lib === FLOOR) {
    await floorChild(cfg)
    return
  }
  const base = cfg.lib.replace(/index\.ts$/, '')
  const { Bridge } = await import(base + 'bridge/bridge') as typeof import('../lib/bridge/bridge')
  const { Hub } = await import(base + 'hub/hub') as typeof import('../lib/hub/hub')
  const { Keys } = await import(base + 'core/keys') as typeof import('../lib/core/keys')
  const { createBroker } = await import(base + 'broker/create-broker') as typeof import('../lib/broker/create-broker')
  const pino = (await import('pino')).default
  const log = pino({ level: 'silent' })
  const connect = (): Redis => new Redis(cfg.port, '127.0.0.1', { maxRetriesPerRequest: null })
  const cmd = connect()
  const subscriber = connect()
  const blocking = connect()
  const broker = createBroker(cmd, subscriber)
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' } as any)
  const hub = new Hub({ redis: cmd, broker, keys, throttleMs: 0, sweepReadsPerSecond: 0, log })
  const counter = new Counter()
  for (const jobId of cfg.jobs) {
    const opened = await hub.open({ kind: 'bench', queue: QUEUE, jobId })
    if (opened === null) throw new Error(`job ${jobId} not found`)
    opened.attach({ deliver: (event) => counter.add((event.data as { s?: unknown } | undefined)?.s) })
  }
  // What the plugin registers: upload cleanup, which acts on final events only.
  const bridge = new Bridge({ redis: cmd, blocking, broker, keys, queues: [QUEUE], group: 'jp-bridge', consumer: `c${process.pid}`, blockMs: 2_000, claimIdleMs: 10_000, claimIntervalMs: 5_000, consumerIdleMs: 60_000, log, local: (channel, payload) => hub.relay(channel, payload), onEvent: () => {}, progressListeners: false })
  await bridge.start()
  counter.serve(async () => {
    await bridge.close()
    hub.close()
    cmd.disconnect()
    subscriber.disconnect()
  })
}

async function main (): Promise<void> {
  const rates = opt('rates', '500,2000,8000').split(',').map(Number)
  const seconds = Number(opt('seconds', '3'))
  const instances = Number(opt('instances', '2'))
  const rounds = Number(opt('rounds', '3'))
  const libs: Array<[string, string]> = [['plugin', join(ROOT, 'lib', 'index.ts')]]
  if (process.env.BENCH_CANDIDATE !== undefined) libs.push(['candidate', process.env.BENCH_CANDIDATE])
  if (argv.includes('--floor')) libs.push([FLOOR, FLOOR])
  const redis = await BenchRedis.start()
  const r = new Redis(redis.port, '127.0.0.1')
  process.on('exit', () => { killAll(); redis.proc.kill('SIGKILL') })
  try {
    // Jobs as BullMQ keeps them, active, so that every hub's first read finds them.
    const jobs = Array.from({ length: JOBS }, (_, i) => `j${i}`)
    for (const jobId of jobs) {
      await r.hset(`bull:${QUEUE}:${jobId}`, 'name', 'bench', 'data', '{}', 'opts', '{}', 'timestamp', Date.now(), 'processedOn', Date.now(), 'attemptsMade', 0, 'progress', '{"processed":0,"total":1000000}', 'jpOwner', 'o')
      await r.lpush(`bull:${QUEUE}:active`, jobId)
    }
    await r.xgroup('CREATE', `bull:${QUEUE}:events`, 'jp-bridge', '$', 'MKSTREAM')
    const setups = await Promise.all(libs.map(async ([name, lib]) => {
      const procs = Array.from({ length: instances }, (_, i) => new Child('bench/relay.ts', ['--child'], { label: `relay-${name}-${i}`, env: { BENCH_CONFIG: JSON.stringify({ port: redis.port, lib, jobs }) } }))
      await Promise.all(procs.map(async p => await p.ready))
      return { name, procs }
    }))
    const results = new Map<string, Map<number, Step[]>>(libs.map(([name]) => [name, new Map(rates.map(rate => [rate, []]))]))
    let seq = 1
    for (let round = 0; round < rounds; round++) {
      for (const rate of rates) {
        for (let k = 0; k < setups.length; k++) {
          // Both copies share the stream's group: each runs alone, in turn (first one rotates).
          const setup = setups[(k + round) % setups.length]
          const others = setups.filter(s => s !== setup)
          for (const o of others) await Promise.all(o.procs.map(async p => await p.call('exit').catch(() => {})))
          const step = await run(r, redis, setup.procs, rate, seconds, jobs, () => seq++, setup.name === FLOOR)
          ;(results.get(setup.name)?.get(rate) as Step[]).push(step)
          process.stderr.write(`${setup.name} rate ${rate}/s round ${round}: ${fmt(sum(step.cpu) / step.events * 10_000, 3)} s/10k events, p50 ${fmt(step.p50, 2)} ms, p99 ${fmt(step.p99, 2)} ms, ${step.delivered}/${step.events * instances} delivered\n`)
          for (const o of others) {
            o.procs = o.procs.map((_, i) => new Child('bench/relay.ts', ['--child'], { label: `relay-${o.name}-${i}`, env: { BENCH_CONFIG: JSON.stringify({ port: redis.port, lib: libs.find(l => l[0] === o.name)?.[1], jobs }) } }))
            await Promise.all(o.procs.map(async p => await p.ready))
          }
        }
      }
    }
    const rows: Array<Array<string | number>> = []
    for (const [name, byRate] of results) {
      for (const [rate, steps] of byRate) {
        const events = sum(steps.map(s => s.events))
        const per = (x: number): string => fmt(x / events * 10_000, 3)
        const cmds: Record<string, number> = {}
        for (const s of steps) for (const [c, n] of Object.entries(s.commands)) cmds[c] = (cmds[c] ?? 0) + n
        rows.push([name, rate, events, per(sum(steps.flatMap(s => s.cpu))), fmt(median(steps.map(s => sum(s.cpu) / s.events * 10_000)), 3), per(sum(steps.map(s => s.redisCpu))), fmt(sum(Object.values(cmds)) / events, 2),
          Object.entries(cmds).sort((a, b) => b[1] - a[1]).filter(([, n]) => n / events >= 0.01).map(([c, n]) => `${c}:${fmt(n / events, 2)}`).join(' '), `${sum(steps.map(s => s.delivered))}/${events * instances}`,
          fmt(median(steps.map(s => s.p50)), 2), steps.map(s => fmt(s.p99, 1)).join('/'), fmt(median(steps.map(s => s.p99)), 2)])
      }
    }
    process.stdout.write(table(`Relay path: ${instances} instance(s), ${JOBS} jobs watched on each, ${rounds} rounds × ${seconds} s per rate, copies taking turns`,
      ['lib', 'events/s', 'events', 'CPU s/10k (all instances)', 'median of rounds', 'redis CPU s/10k', 'redis cmds/event', 'commands per event', 'delivered', 'p50 ms (median)', 'p99 ms rounds', 'p99 median'], rows) + '\n')
    for (const s of setups) await Promise.all(s.procs.map(async p => await p.stop()))
  } finally {
    r.disconnect()
    await redis.stop().catch(() => {})
  }
}

const sum = (xs: number[]): number => xs.reduce((a, b) => a + b, 0)
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

/** Writes `rate` progress entries per second for `seconds`, in 10 ms ticks, and measures. */
async function run (r: Redis, redis: BenchRedis, procs: Child[], rate: number, seconds: number, jobs: string[], next: () => number, floor: boolean): Promise<Step> {
  const stream = `bull:${QUEUE}:events`
  await Promise.all(procs.map(async p => await p.call('latencies')))
  const before = { cpu: await Promise.all(procs.map(async p => await p.call<number>('cpu'))), delivered: sum(await Promise.all(procs.map(async p => await p.call<number>('delivered')))), redis: await redis.snapshot() }
  const ticks = seconds * 100
  let events = 0
  const t0 = Date.now()
  for (let tick = 0; tick < ticks; tick++) {
    const due = Math.round(rate * (tick + 1) / 100) - events
    if (due > 0) {
      const pipe = r.pipeline()
      for (let i = 0; i < due; i++) {
        const n = next()
        pipe.xadd(stream, 'MAXLEN', '~', 10_000, '*', 'event', 'progress', 'jobId', jobs[n % jobs.length], 'data', `{"processed":${n},"total":1000000,"data":{"s":${performance.timeOrigin + performance.now()}}}`)
      }
      await pipe.exec()
      events += due
    }
    const wait = t0 + (tick + 1) * 10 - Date.now()
    if (wait > 0) await new Promise(resolve => setTimeout(resolve, wait))
  }
  // Everything read and delivered: the group has nothing left to hand out (the floor: every
  // instance counted every event; then the groups skip what it read, for the plugin's next turn).
  const deadline = Date.now() + 10_000
  while (Date.now() < deadline) {
    if (floor) {
      if (sum(await Promise.all(procs.map(async p => await p.call<number>('delivered')))) - before.delivered >= events * procs.length) break
    } else {
      const groups = await r.xinfo('GROUPS', stream) as unknown[][]
      const lag = groups[0][groups[0].indexOf('lag') + 1]
      if (lag === 0) break
    }
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  if (floor) {
    for (const group of await r.xinfo('GROUPS', stream) as unknown[][]) await r.xgroup('SETID', stream, group[1] as string, '$')
  }
  await new Promise(resolve => setTimeout(resolve, 200))
  const after = { cpu: await Promise.all(procs.map(async p => await p.call<number>('cpu'))), delivered: sum(await Promise.all(procs.map(async p => await p.call<number>('delivered')))), redis: await redis.snapshot() }
  const commands: Record<string, number> = {}
  for (const [c, n] of Object.entries(after.redis.commands)) {
    const d = n - (before.redis.commands[c] ?? 0)
    if (d > 0 && c !== 'xadd' && c !== 'info' && c !== 'xinfo') commands[c] = d
  }
  const lat = percentiles(await Promise.all(procs.map(async p => await p.call<Float64Array>('latencies'))))
  return { events, cpu: after.cpu.map((c, i) => c - before.cpu[i]), delivered: after.delivered - before.delivered, commands, redisCpu: after.redis.cpu - before.redis.cpu, p50: lat.p50, p99: lat.p99 }
}

if (argv.includes('--child')) {
  child().catch((err) => { process.stderr.write(`relay child: ${(err as Error).stack ?? String(err)}\n`); process.exit(1) })
} else {
  main().catch((err) => { process.stderr.write(`relay bench: ${(err as Error).stack ?? String(err)}\n`); process.exitCode = 1 }).finally(() => killAll())
}
