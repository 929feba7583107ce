import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import { request } from 'node:http'
import { cpus, loadavg, tmpdir, totalmem } from 'node:os'
import { dirname, join } from 'node:path'
import { randomBytes, randomUUID } from 'node:crypto'
import { Redis } from 'ioredis'
import { benchPids, Child, killAll, machineBusySeconds, openFileLimit, procCounters, procCpuSeconds, ROOT } from './lib/proc'
import { BenchRedis, redisDelta, type RedisCounters, type RedisDelta } from './lib/redis'
import { fmt, percentiles, round, table } from './lib/stats'

/**
 * The benchmark: this plugin at 1, 2 and 4 API instances against a floor (one QueueEvents per
 * process writing straight to `ws` sockets) and Socket.IO with its Redis adapter, fed twice: by
 * the driver's own emitter (`sio`, the most favourable timing) and by one QueueEvents relay
 * process (`sioRelay`, what an application deploys), all in one run on this machine, so that results are ratios between peers measured together.
 * Peers that are compared are up at the same time and take turns in rounds, so that a change in
 * the machine's background load hits them alike; the CPU used by other processes during each
 * step is reported.
 *
 *   npm run bench               full run (about 4-5 minutes)
 *   npm run bench -- --quick    smaller run (about 1 minute)
 *   npm run bench -- --profile  also writes a CPU profile of every server over each measured
 *                               step to bench/results/*.cpuprofile (read with bench/profile.ts)
 *   npm run bench -- --only=fanout,tail,few,redis,idle,upload   run some workloads only
 *   npm run bench -- --instances=1   instance count of the comparison (default 2)
 */
const argv = process.argv.slice(2)
const QUICK = argv.includes('--quick')
const PROFILE = argv.includes('--profile')
const ONLY = argv.find(a => a.startsWith('--only='))?.slice(7).split(',')
// --instances=N: the instance count of the comparison (fan-out in --quick, saturation, targets).
const INSTANCES = Number(argv.find(a => a.startsWith('--instances='))?.slice(12) ?? 2)
// --few=1,2: sockets per job of the few-watchers workload (default both).
const FEW = argv.find(a => a.startsWith('--few='))?.slice(6).split(',').map(Number)
// --sat=plugin,limit: the systems that climb the saturation ramp (default: see CFG.satSystems).
const SAT = argv.find(a => a.startsWith('--sat='))?.slice(6).split(',')
// --few-instances=1: instance counts of the few-watchers workload (default 1,2).
const FEW_INSTANCES = argv.find(a => a.startsWith('--few-instances='))?.slice(16).split(',').map(Number)

// BENCH_CANDIDATE=/path/to/lib/index.ts adds a "candidate" system: the plugin loaded from another
// copy of lib/, measured in the same rounds as the others (to try a change before making it).
const CANDIDATE = process.env.BENCH_CANDIDATE
// BENCH_PLUGIN=/path/to/lib/index.ts: the "plugin" system from another copy of lib/ (a commit's
// lib/, when the checkout holds uncommitted work that is not under test).
const PLUGIN = process.env.BENCH_PLUGIN ?? join(ROOT, 'lib', 'index.ts')
type System = 'plugin' | 'candidate' | 'floor' | 'sio' | 'sioRelay' | 'limit'
const SYSTEMS: System[] = CANDIDATE === undefined ? ['plugin', 'floor', 'sio', 'sioRelay'] : ['plugin', 'candidate', 'floor', 'sio', 'sioRelay']
const NAMES: Record<System | 'none', string> = { plugin: 'plugin', candidate: 'plugin candidate', floor: 'floor (QueueEvents→ws)', sio: 'socket.io+redis-adapter', sioRelay: 'socket.io+QueueEvents relay', limit: 'limit (prebuilt frames)', none: 'driver only' }
/**
 * The saturation ramp's ceiling (bench/servers/limit.ts): the floor's read with one prebuilt
 * frame per event written to its sockets, once per socket and turn. Up in the fan-out at the
 * saturation's instance count only, and climbs with the others.
 */
const LIMIT: System[] = ['limit']
/**
 * Systems whose memory and Redis work per event are measured. `sioRelay` runs the servers of
 * `sio` (same sockets, same memory), and its relay's Redis work is the floor's one QueueEvents.
 */
const MEASURED: System[] = SYSTEMS.filter(s => s !== 'sioRelay')
const OWNER = 'bench-owner'

const CFG = QUICK
  ? {
      jobs: 20,
      perJob: 20,
      rate: 10,
      fanoutMs: 1_500,
      rounds: 3,
      fanout: [{ instances: INSTANCES, systems: [...SYSTEMS, ...LIMIT] }],
      satInstances: INSTANCES,
      satRates: [40, 80, 160, 320, 640, 1280],
      satMs: 1_000,
      satSystems: SAT ?? [...SYSTEMS.filter(s => s !== 'floor'), ...LIMIT],
      redisInstances: [1, 4],
      redisMs: 1_200,
      redisJobs: 20,
      redisRate: 10,
      redisSystems: MEASURED.filter(s => s !== 'sio'),
      idleSockets: 2_000,
      idleJobs: 100,
      uploadBytes: 200 * 1024 * 1024,
      uploadRounds: 1,
      tailJobs: 50,
      tailPerJob: 10,
      tailRate: 10,
      tailMs: 1_500,
      tailRounds: 5,
      tailInstances: [1, 2],
      fewJobs: 1_000,
      fewPerJob: FEW ?? [1, 2],
      fewRate: 5,
      fewMs: 1_500,
      fewRounds: 3,
      fewInstances: FEW_INSTANCES ?? [1, 2]
    }
  : {
      jobs: 20,
      perJob: 20,
      rate: 10,
      fanoutMs: 2_000,
      rounds: 6,
      fanout: [...new Set([1, 2, 4, INSTANCES])].sort().map(instances => ({ instances, systems: instances === INSTANCES ? [...SYSTEMS, ...LIMIT] : SYSTEMS })),
      satInstances: INSTANCES,
      satRates: [20, 40, 80, 160, 320, 640, 1280],
      satMs: 1_500,
      satSystems: SAT ?? [...SYSTEMS, ...LIMIT],
      redisInstances: [1, 2, 4],
      redisMs: 2_500,
      redisJobs: 20,
      redisRate: 10,
      redisSystems: MEASURED,
      idleSockets: 10_000,
      idleJobs: 100,
      uploadBytes: 200 * 1024 * 1024,
      uploadRounds: 2,
      tailJobs: 50,
      tailPerJob: 10,
      tailRate: 10,
      tailMs: 3_000,
      tailRounds: 7,
      tailInstances: [1, 2],
      fewJobs: 1_000,
      fewPerJob: FEW ?? [1, 2],
      fewRate: 5,
      fewMs: 3_000,
      fewRounds: 5,
      fewInstances: FEW_INSTANCES ?? [1, 2]
    }
/**
 * Unmeasured load at the step's rate before each measured step: a server idle during its peers'
 * turns lets V8 shrink its heap, and those major GCs (15-40 ms) would land in its next step.
 */
const WARM_MS = QUICK ? 300 : 500
/**
 * Unmeasured load on every system once, before the first round of a comparison: without it the
 * first round carries each system's JIT compiling (per round, server CPU of one system in one run:
 * 0.52 s per 10k messages in its first round, 0.39 to 0.41 in its last two).
 */
const FIRST_WARM_MS = QUICK ? 1_000 : 3_000
const CLIENT_PROCS = 4
const FANOUT_CLIENT_PROCS = 2
const P99_LIMIT_MS = 100
/** The saturation ramp's last rate per job, past which a system that never failed is reported as a lower bound. */
const SAT_MAX_RATE = 10_240
/** Share of a saturation step's messages a system may fail to deliver and still pass it. */
const MAX_LOSS_PCT = 0.1
/** A round in which other processes kept more than this share of the machine busy is "disturbed". */
const OTHER_CPU_LIMIT_PCT = 15
const DEADLINE_MS = QUICK ? 900_000 : 1_800_000

const tmp = mkdtempSync(join(tmpdir(), 'jp-bench-'))
const resultsDir = join(ROOT, 'bench', 'results')
mkdirSync(resultsDir, { recursive: true })
let redis: BenchRedis | null = null
let driver: Child
let clients: Child[] = []
let setupNo = 0
const started = Date.now()

/**
 * The plugin as it ships: a copy of lib/ compiled by tsc as `npm run build` does, into the
 * bench's temporary directory. Run through the TypeScript loader instead, every function the
 * plugin makes per event also pays that loader's naming helper, which the package does not have.
 * A .js entry (an already built copy) is taken as it is; with --profile the TypeScript stays, so
 * that profiles name lib/'s lines.
 */
const builds = new Map<string, string>()
function compiled (entry: string): string {
  if (entry.endsWith('.js') || PROFILE) return entry
  let built = builds.get(entry)
  if (built !== undefined) return built
  const out = join(tmp, `build-${builds.size}`)
  if (!existsSync(join(tmp, 'node_modules'))) symlinkSync(join(ROOT, 'node_modules'), join(tmp, 'node_modules'))
  execFileSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(dirname(entry), '..', 'tsconfig.json'),
    '--outDir', out, '--declaration', 'false', '--sourceMap', 'false'], { stdio: 'inherit' })
  built = join(out, 'index.js')
  builds.set(entry, built)
  return built
}

const log = (line: string): void => { process.stderr.write(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)}s] ${line}\n`) }
const sleep = async (ms: number): Promise<void> => await new Promise(resolve => setTimeout(resolve, ms))
const sum = (xs: number[]): number => xs.reduce((a, b) => a + b, 0)
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length === 0 ? NaN : s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}
const cleanupSync = (): void => {
  killAll()
  redis?.kill()
  try { rmSync(tmp, { recursive: true, force: true }) } catch {}
}
process.on('exit', cleanupSync)
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(signal, () => {
    log(`${signal}: stopping every bench process`)
    cleanupSync()
    process.exit(130)
  })
}

// ---------------------------------------------------------------------------------------------
// Servers, setups and steps

function spawnServer (system: System | 'plain' | 'relay', label: string, extra: Record<string, unknown> = {}): Child {
  const script = {
    plugin: 'bench/servers/plugin.ts',
    candidate: 'bench/servers/plugin.ts',
    floor: 'bench/servers/floor.ts',
    limit: 'bench/servers/limit.ts',
    sio: 'bench/servers/sio.ts',
    sioRelay: 'bench/servers/sio.ts',
    relay: 'bench/servers/sio-relay.ts',
    plain: 'bench/servers/plain-upload.ts'
  }[system]
  return new Child(script, [], {
    label,
    // BENCH_NODE_FLAGS: more flags for every server (--trace-gc, --max-semi-space-size=...).
    node: ['--expose-gc', ...(process.env.BENCH_NODE_FLAGS ?? '').split(' ').filter(f => f !== '')],
    manyFiles: true,
    env: {
      BENCH_CONFIG: JSON.stringify({ redisUrl: redis?.url, uploadDir: join(tmp, `up-${label}`), fileSize: 512 * 1024 * 1024, ...extra }),
      ...(system === 'plugin' || system === 'candidate' ? { BENCH_LIB: compiled(system === 'candidate' ? CANDIDATE as string : PLUGIN) } : {})
    }
  })
}

function socketUrl (system: System, port: number, jobId: string): string {
  if (system === 'plugin' || system === 'candidate') return `ws://127.0.0.1:${port}/ws/bench/${jobId}`
  if (system === 'floor' || system === 'limit') return `ws://127.0.0.1:${port}/ws/${jobId}`
  return `http://127.0.0.1:${port}`
}

/** The kind of client socket a system's clients open: `sioRelay` has the servers of `sio`, `limit` the sockets of the floor. */
const clientKind = (system: System): Exclude<System, 'sioRelay' | 'limit'> => system === 'sioRelay' ? 'sio' : system === 'limit' ? 'floor' : system

interface SetupSpec { system: System | 'none', instances: number, topology: 'spread' | 'one', jobs: number, perJob: number, label: string }

/** One system's servers, jobs and client sockets, up until {@link stopSetup}. */
interface Setup {
  spec: SetupSpec
  set: string
  servers: Child[]
  /** `sioRelay`'s QueueEvents relay; its CPU counts as the system's server CPU. */
  relay: Child | null
  procs: Child[]
  jobIds: string[]
}

async function startSetup (spec: SetupSpec): Promise<Setup> {
  const set = `${spec.label}#${setupNo++}`
  const queue = `q${setupNo}`
  const system = spec.system
  const servers = system === 'none' ? [] : Array.from({ length: spec.instances }, (_, i) => spawnServer(system, `${spec.label}-${i}`, { queue }))
  const relay = system === 'sioRelay' ? spawnServer('relay', `${spec.label}-relay`, { queue }) : null
  const setup: Setup = { spec, set, servers, relay, procs: system === 'none' ? [] : clients.slice(0, FANOUT_CLIENT_PROCS), jobIds: [] }
  const ports = (await Promise.all(servers.map(async s => await s.ready))).map(r => r.port as number)
  await relay?.ready
  if (process.env.BENCH_DEBUG !== undefined) {
    for (const s of relay === null ? servers : [...servers, relay]) log(`  ${s.label}: pid ${s.pid}, started at ${fmt(await s.call<number>('timeOrigin'), 0)} ms`)
  }
  const { jobIds } = await driver.call<{ jobIds: string[] }>('init', { set, redisUrl: redis?.url, queue, jobs: spec.jobs, owner: OWNER, activate: true, emitter: system === 'sio' })
  setup.jobIds = jobIds
  if (system !== 'none') {
    const subs: Array<{ url: string, jobIndex: number, jobId: string, instance: number }> = []
    for (let j = 0; j < jobIds.length; j++) {
      for (let k = 0; k < spec.perJob; k++) {
        const instance = spec.topology === 'one' ? 0 : (j * spec.perJob + k) % spec.instances
        subs.push({ url: socketUrl(system, ports[instance], jobIds[j]), jobIndex: j, jobId: jobIds[j], instance })
      }
    }
    await Promise.all(setup.procs.map(async (p, i) => await p.call('open', { set, system: clientKind(system), owner: OWNER, subs: subs.filter((_, k) => k % setup.procs.length === i) })))
  }
  return setup
}

async function stopSetup (setup: Setup): Promise<void> {
  const { spec, set } = setup
  await driver.call('finish', { set }).catch((err: Error) => log(`driver finish: ${err.message}`))
  // The plugin closes each socket with 1000 after the job's final message: wait for that.
  const pluginLike = spec.system === 'plugin' || spec.system === 'candidate'
  const closed = await Promise.all(setup.procs.map(async p => await p.call('closeAll', { set, waitFinalMs: pluginLike ? 6_000 : undefined }).catch(() => null)))
  if (pluginLike && closed.every(c => c !== null)) {
    const codes: Record<string, number> = {}
    for (const c of closed) for (const [k, v] of Object.entries<number>(c.closeCodes)) codes[k] = (codes[k] ?? 0) + v
    const finals = sum(closed.map(c => c.finals))
    const byServer = sum(closed.map(c => c.closedByServer))
    results.finalCheck ??= []
    results.finalCheck.push({ setup: spec.label, sockets: spec.jobs * spec.perJob, finals, closedWith1000: byServer, closeCodes: codes })
    if (byServer < spec.jobs * spec.perJob) log(`  note: ${byServer}/${spec.jobs * spec.perJob} plugin sockets of ${spec.label} got the final message and a 1000 close within 6 s (close codes ${JSON.stringify(codes)})`)
  }
  await Promise.all([...setup.servers, ...(setup.relay === null ? [] : [setup.relay])].map(async s => await s.stop()))
}

/** Starts several setups, runs `body`, and always stops them and flushes Redis. */
async function withSetups<T> (specs: SetupSpec[], body: (setups: Setup[]) => Promise<T>): Promise<T> {
  const setups: Setup[] = []
  try {
    // One after the other: parallel spawns would only fight over two cores.
    for (const spec of specs) setups.push(await startSetup(spec))
    await sleep(300)
    return await body(setups)
  } finally {
    for (const s of setups) await stopSetup(s)
    await redis?.flush()
  }
}

interface Snap { servers: number[], relay: number, driver: number, clients: number[], redis: RedisCounters, io: Array<ReturnType<typeof procCounters>>, machine: number, bench: number, at: number }

async function snap (setup: Setup): Promise<Snap> {
  const [s, rl, d, c, r] = await Promise.all([
    Promise.all(setup.servers.map(async x => await x.call<number>('cpu'))),
    setup.relay?.call<number>('cpu') ?? 0,
    driver.call<number>('cpu'),
    Promise.all(setup.procs.map(async x => await x.call<number>('cpu'))),
    (redis as BenchRedis).snapshot()
  ])
  const pids = [...benchPids(), redis?.proc.pid as number, process.pid]
  return { servers: s, relay: rl, driver: d, clients: c, redis: r, io: setup.servers.map(x => procCounters(x.pid)), machine: machineBusySeconds(), bench: sum(pids.map(procCpuSeconds).filter(x => !Number.isNaN(x))), at: Date.now() }
}

interface StepResult {
  rate: number
  durationMs: number
  wallMs: number
  events: number
  targetMsgsPerSec: number
  sockets: number
  expected: number
  received: number
  lossPct: number
  socketsShort: number
  worstSocketRatio: number
  /** Progress messages one socket received in the step: fewest, most, and the most it could have. */
  perSocket: { minReceived: number, maxReceived: number, maxExpected: number }
  duplicates: number
  outOfOrder: number
  deliveredPerSec: number
  p50: number
  p99: number
  max: number
  driverLateMs: number
  /** `servers` holds the relay's CPU too (the system's server side); `relay` is that share. */
  cpu: { servers: number, relay: number, driver: number, clients: number, redis: number }
  cpuPer10k: { servers: number, relay: number, driver: number, redis: number, clients: number }
  /** Servers' system calls and context switches per delivered message. */
  serverPerMsg: { writeCalls: number, readCalls: number, ctxSwitches: number }
  /** Share of the machine (all cores) busy with processes that are not the bench's, in %. */
  otherCpuPct: number
  redis: RedisDelta & { commandsPerEvent: number, bytesOutPerEvent: number }
  /** The plugin's stats() of each server after the step (cumulative). */
  pluginStats?: unknown[] | null
  latencies?: Float64Array[]
}

/** Unmeasured load: the setup's jobs at `rate` updates/s each for `ms`, their latencies dropped. */
async function warmUp (set: string, rate: number, ms: number): Promise<void> {
  const warm = await driver.call('run', { set, rate, durationMs: ms, dir: tmp }, ms + 60_000)
  rmSync(warm.file, { force: true })
}

/** Drives the setup's jobs at `rate` updates/s each for `durationMs` and measures everything. */
async function step (setup: Setup, rate: number, durationMs: number, tag = ''): Promise<StepResult> {
  const { servers, procs, spec, set } = setup
  await warmUp(set, rate, WARM_MS)
  await sleep(50)
  if (PROFILE) await Promise.all(servers.map(async s => await s.call('profileStart')))
  const before = await snap(setup)
  const run = await driver.call('run', { set, rate, durationMs, dir: tmp }, durationMs + 60_000)
  const collected = await Promise.all(procs.map(async p => await p.call('collect', { set, file: run.file, cap: run.cap, from: run.from, to: run.to, waitMs: 15_000, quietMs: 1_000 }, 60_000)))
  const after = await snap(setup)
  const pluginStats = spec.system === 'plugin' || spec.system === 'candidate'
    ? await Promise.all(servers.map(async s => await s.call('stats').catch(() => null)))
    : null
  if (PROFILE) await Promise.all(servers.map(async s => await s.call('profileStop', join(resultsDir, `${s.label}-R${rate}${tag}.cpuprofile`))))
  rmSync(run.file, { force: true })
  const latencies = collected.map(c => c.latencies as Float64Array)
  if (process.env.BENCH_DEBUG !== undefined) {
    // Messages over 10 ms, grouped by server and by 20 ms of arrival time: a stall shows as one group.
    const slow = collected.flatMap(c => c.slow as Array<{ at: number, ms: number, instance: number }>)
    const groups = new Map<string, { n: number, max: number }>()
    for (const m of slow) {
      const k = `i${m.instance}@${Math.floor((m.at - before.at) / 20) * 20}ms`
      const g = groups.get(k) ?? { n: 0, max: 0 }
      g.n++
      g.max = Math.max(g.max, m.ms)
      groups.set(k, g)
    }
    if (slow.length > 0) log(`  ${spec.label} R=${rate}${tag} from ${fmt(before.at, 0)}: ${slow.length} messages over 10 ms: ${[...groups].sort((a, b) => b[1].n - a[1].n).slice(0, 6).map(([k, g]) => `${k} ×${g.n} (max ${fmt(g.max, 0)})`).join(', ')}`)
  }
  const lat = percentiles(latencies)
  const received = sum(collected.map(c => c.received))
  const expected = sum(collected.map(c => c.expected))
  const relay = after.relay - before.relay
  const cpu = {
    servers: sum(after.servers) - sum(before.servers) + relay,
    relay,
    driver: after.driver - before.driver,
    clients: sum(after.clients) - sum(before.clients),
    redis: after.redis.cpu - before.redis.cpu
  }
  const per10k = (x: number): number => received > 0 ? x / received * 10_000 : NaN
  const rd = redisDelta(before.redis, after.redis)
  const events = run.sent as number
  const wallMs = after.at - before.at
  const delta = (k: 'syscw' | 'syscr' | 'ctxSwitches'): number => sum(after.io.map((x, i) => x[k] - before.io[i][k])) / received
  return {
    rate,
    durationMs,
    wallMs,
    events,
    targetMsgsPerSec: rate * spec.jobs * (spec.system === 'none' ? 0 : spec.perJob),
    sockets: sum(collected.map(c => c.sockets)),
    expected,
    received,
    lossPct: expected > 0 ? (1 - received / expected) * 100 : 0,
    socketsShort: sum(collected.map(c => c.socketsShort)),
    worstSocketRatio: Math.min(1, ...collected.map(c => c.worstRatio)),
    perSocket: { minReceived: Math.min(...collected.map(c => c.minReceived)), maxReceived: Math.max(...collected.map(c => c.maxReceived)), maxExpected: Math.max(...collected.map(c => c.maxExpected)) },
    duplicates: sum(collected.map(c => c.duplicates)),
    outOfOrder: sum(collected.map(c => c.outOfOrder)),
    deliveredPerSec: received / (durationMs / 1000),
    p50: lat.p50,
    p99: lat.p99,
    max: lat.max,
    driverLateMs: run.lateMs,
    cpu,
    cpuPer10k: { servers: per10k(cpu.servers), relay: per10k(cpu.relay), driver: per10k(cpu.driver), redis: per10k(cpu.redis), clients: per10k(cpu.clients) },
    serverPerMsg: { writeCalls: delta('syscw'), readCalls: delta('syscr'), ctxSwitches: delta('ctxSwitches') },
    otherCpuPct: Math.max(0, ((after.machine - before.machine) - (after.bench - before.bench)) / (wallMs / 1000) / cpus().length * 100),
    redis: { ...rd, commandsPerEvent: rd.commands / events, bytesOutPerEvent: rd.netOut / events },
    pluginStats,
    latencies
  }
}

/** Several steps of one setup as one result: counts and CPU summed, latency pooled, plus the median of the rounds' p99. */
function pool (steps: StepResult[]): StepResult & { rounds: number, p99Rounds: number[], p99Median: number, cpuRounds: number[] } {
  const latencies = steps.flatMap(s => s.latencies ?? [])
  const lat = percentiles(latencies)
  const received = sum(steps.map(s => s.received))
  const expected = sum(steps.map(s => s.expected))
  const events = sum(steps.map(s => s.events))
  const durationMs = sum(steps.map(s => s.durationMs))
  const cpu = {
    servers: sum(steps.map(s => s.cpu.servers)),
    relay: sum(steps.map(s => s.cpu.relay)),
    driver: sum(steps.map(s => s.cpu.driver)),
    clients: sum(steps.map(s => s.cpu.clients)),
    redis: sum(steps.map(s => s.cpu.redis))
  }
  const per10k = (x: number): number => received > 0 ? x / received * 10_000 : NaN
  const byCommand: Record<string, number> = {}
  for (const s of steps) for (const [k, v] of Object.entries(s.redis.byCommand)) byCommand[k] = (byCommand[k] ?? 0) + v
  const commands = sum(steps.map(s => s.redis.commands))
  const netOut = sum(steps.map(s => s.redis.netOut))
  const weighted = (f: (s: StepResult) => number): number => sum(steps.map(s => f(s) * s.received)) / received
  return {
    ...steps[0],
    durationMs,
    wallMs: sum(steps.map(s => s.wallMs)),
    events,
    expected,
    received,
    lossPct: expected > 0 ? (1 - received / expected) * 100 : 0,
    socketsShort: Math.max(...steps.map(s => s.socketsShort)),
    worstSocketRatio: Math.min(...steps.map(s => s.worstSocketRatio)),
    perSocket: { minReceived: sum(steps.map(s => s.perSocket.minReceived)), maxReceived: sum(steps.map(s => s.perSocket.maxReceived)), maxExpected: sum(steps.map(s => s.perSocket.maxExpected)) },
    duplicates: sum(steps.map(s => s.duplicates)),
    outOfOrder: sum(steps.map(s => s.outOfOrder)),
    deliveredPerSec: received / (durationMs / 1000),
    p50: lat.p50,
    p99: lat.p99,
    max: lat.max,
    driverLateMs: Math.max(...steps.map(s => s.driverLateMs)),
    cpu,
    cpuPer10k: { servers: per10k(cpu.servers), relay: per10k(cpu.relay), driver: per10k(cpu.driver), redis: per10k(cpu.redis), clients: per10k(cpu.clients) },
    serverPerMsg: { writeCalls: weighted(s => s.serverPerMsg.writeCalls), readCalls: weighted(s => s.serverPerMsg.readCalls), ctxSwitches: weighted(s => s.serverPerMsg.ctxSwitches) },
    otherCpuPct: sum(steps.map(s => s.otherCpuPct * s.wallMs)) / sum(steps.map(s => s.wallMs)),
    redis: { commands, byCommand, netOut, netIn: sum(steps.map(s => s.redis.netIn)), cpu: cpu.redis, commandsPerEvent: commands / events, bytesOutPerEvent: netOut / events },
    rounds: steps.length,
    p99Rounds: steps.map(s => s.p99),
    p99Median: median(steps.map(s => s.p99)),
    cpuRounds: steps.map(s => s.cpuPer10k.servers),
    latencies: undefined
  }
}

/** Server CPU per 10k delivered messages, with the relay's share when the system has one. */
const serverCpu = (r: StepResult): string => `${fmt(r.cpuPer10k.servers, 3)} s/10k${r.cpu.relay > 0 ? ` (servers ${fmt(r.cpuPer10k.servers - r.cpuPer10k.relay, 3)} + relay ${fmt(r.cpuPer10k.relay, 3)})` : ''}`

const strip = <T extends { latencies?: unknown }>(r: T): Omit<T, 'latencies'> => {
  const { latencies: _, ...rest } = r
  return rest
}

// ---------------------------------------------------------------------------------------------
// Workloads

const results: Record<string, any> = {}

/**
 * Every system of `specs` up at once, taking turns at one rate over several rounds (who goes
 * first rotates); one pooled result per system, with its rounds' p99 and their median.
 */
async function takeTurns (name: string, specs: SetupSpec[], rate: number, ms: number, rounds: number, after?: (setups: Setup[]) => Promise<void>): Promise<any[]> {
  const out: any[] = []
  await withSetups(specs, async (setups) => {
    const steps = new Map<System, StepResult[]>(setups.map(s => [s.spec.system as System, []]))
    for (const { set } of setups) await warmUp(set, rate, FIRST_WARM_MS)
    for (let round = 0; round < rounds; round++) {
      // Rotate who goes first, so that no system always runs right after the same neighbour.
      for (let k = 0; k < setups.length; k++) {
        const setup = setups[(k + round) % setups.length]
        const r = await step(setup, rate, ms, `-round${round}`)
        ;(steps.get(setup.spec.system as System) as StepResult[]).push(r)
      }
    }
    // Latency is compared over the rounds in which the machine was not busy with other work
    // (for every system of the round alike); all rounds when there is no such round.
    const disturbed = Array.from({ length: rounds }, (_, round) => [...steps.values()].some(list => list[round].otherCpuPct > OTHER_CPU_LIMIT_PCT))
    const clean = disturbed.every(d => d) ? disturbed.map(() => true) : disturbed.map(d => !d)
    for (const [system, list] of steps) {
      const r = pool(list)
      const p99Clean = median(list.filter((_, i) => clean[i]).map(st => st.p99))
      const n = specs[0].instances
      out.push({ system, instances: n, ...strip(r), roundsDisturbed: disturbed, p99Clean, cleanRounds: clean.filter(Boolean).length, allRoundsDisturbed: disturbed.every(d => d) })
      log(`${name} ${NAMES[system]} ×${n}: ${fmt(r.deliveredPerSec, 0)} msgs/s, p50 ${fmt(r.p50, 2)} ms, p99 ${fmt(r.p99, 2)} ms (rounds ${r.p99Rounds.map((x, i) => fmt(x, 1) + (disturbed[i] ? '*' : '')).join('/')}, median ${fmt(r.p99Median, 1)}), max ${fmt(r.max, 1)} ms, ${r.received}/${r.expected} delivered, server CPU ${serverCpu(r)} (rounds ${r.cpuRounds.map(x => fmt(x, 3)).join('/')}), ${fmt(r.serverPerMsg.writeCalls, 2)} writes/msg, other CPU ${fmt(r.otherCpuPct, 0)}%`)
    }
    if (after !== undefined) await after(setups)
  })
  return out
}

/** Fan-out at each instance count: every system up at once, taking turns over several rounds. */
async function fanout (): Promise<void> {
  results.fanout = []
  results.saturation = {}
  for (const group of CFG.fanout) {
    const n = group.instances
    const specs = group.systems.map(system => ({ system, instances: n, topology: 'spread' as const, jobs: CFG.jobs, perJob: CFG.perJob, label: `fanout-${system}-${n}` }))
    results.fanout.push(...await takeTurns('fan-out', specs, CFG.rate, CFG.fanoutMs, CFG.rounds,
      n === CFG.satInstances ? async (setups) => await saturation(setups.filter(s => CFG.satSystems.includes(s.spec.system as System))) : undefined))
  }
}

/**
 * Tail latency at a moderate load: 50 jobs × 10 sockets × 10 updates/s (5,000 msgs/s), at 1 and
 * 2 instances, every system taking turns; the figure is the median of the rounds' p99.
 */
async function tail (): Promise<void> {
  results.tail = []
  for (const n of CFG.tailInstances) {
    const specs = SYSTEMS.map(system => ({ system, instances: n, topology: 'spread' as const, jobs: CFG.tailJobs, perJob: CFG.tailPerJob, label: `tail-${system}-${n}` }))
    results.tail.push(...await takeTurns('tail', specs, CFG.tailRate, CFG.tailMs, CFG.tailRounds))
  }
}

/**
 * Per-event cost with few watchers per job: 1,000 jobs × 1 (then 2) sockets × 5 updates/s, at 1
 * and 2 instances, the plugin, the floor and Socket.IO fed by its relay taking turns. The figures
 * are server CPU and Redis CPU per 10k delivered messages: with one watcher a job's event is one
 * message, so the per-event work (the bridge's Redis commands, the subscriber's parse) dominates.
 */
async function few (): Promise<void> {
  results.few = []
  const systems = SYSTEMS.filter(s => s !== 'sio')
  for (const perJob of CFG.fewPerJob) {
    for (const n of CFG.fewInstances) {
      const specs = systems.map(system => ({ system, instances: n, topology: 'spread' as const, jobs: CFG.fewJobs, perJob, label: `few${perJob}-${system}-${n}` }))
      for (const r of await takeTurns(`few ×${perJob}`, specs, CFG.fewRate, CFG.fewMs, CFG.fewRounds)) {
        results.few.push({ ...r, perJob })
        log(`few ×${perJob} ${NAMES[r.system as System]} ×${n}: Redis CPU ${fmt(r.cpuPer10k.redis, 3)} s/10k, ${fmt(r.redis.commandsPerEvent, 2)} commands/event`)
      }
    }
  }
  results.publishAlone = await publishAlone()
}

/**
 * What one PUBLISH per event costs Redis on its own, in this run: the floor reads the stream in
 * its own process and publishes nothing, while a relay to per-job channels publishes each event
 * once. A script PUBLISHes a relay message (the plugin's size) to each of the layout's job
 * channels in turn, at its rate, in batches of 10 ms as the relay script does under that load,
 * one subscriber connection holding every channel; Redis CPU per 10k messages, median of rounds.
 */
async function publishAlone (): Promise<{ cpuPer10k: number, rounds: number[], messages: number }> {
  const url = (redis as BenchRedis).url
  const pub = new Redis(url)
  const sub = new Redis(url)
  try {
    const channels = Array.from({ length: CFG.fewJobs }, () => `jp:bench:{${randomUUID()}}`)
    await sub.subscribe(...channels)
    let received = 0
    sub.on('message', () => { received++ })
    const t = Date.now()
    const payload = `{"v":1,"e":"progress","t":${t},"i":"${t}-0","d":{"processed":12,"total":100,"sentAt":${t}.123}}`
    const lua = "for i = 1, #KEYS do redis.call('PUBLISH', KEYS[i], ARGV[1]) end return #KEYS"
    const perTick = CFG.fewJobs * CFG.fewRate / 100
    const rounds: number[] = []
    let next = 0
    for (let round = 0; round < CFG.fewRounds; round++) {
      const before = await (redis as BenchRedis).snapshot()
      const from = received
      const end = Date.now() + CFG.fewMs
      let sent = 0
      while (Date.now() < end) {
        const keys = Array.from({ length: perTick }, () => channels[next++ % channels.length])
        sent += await pub.eval(lua, keys.length, ...keys, payload) as number
        await sleep(10)
      }
      // Until the subscriber has every message of the round (at most 10 s).
      const stop = Date.now() + 10_000
      const behind = (): boolean => received - from < sent && Date.now() < stop
      while (behind()) await sleep(20)
      await sleep(100)
      const after = await (redis as BenchRedis).snapshot()
      rounds.push((after.cpu - before.cpu) / (received - from) * 10_000)
    }
    const r = { cpuPer10k: median(rounds), rounds, messages: received }
    log(`one PUBLISH per event alone (${CFG.fewJobs} channels, one subscriber, ${CFG.fewJobs * CFG.fewRate}/s): Redis CPU ${fmt(r.cpuPer10k, 3)} s/10k (rounds ${rounds.map(x => fmt(x, 3)).join('/')})`)
    return r
  } finally {
    pub.disconnect()
    sub.disconnect()
  }
}

/**
 * Raises R for every system in turn until its p99 passes the limit. A step over the limit is
 * run once more before the system counts as saturated, so that one burst of background load
 * does not end a system's climb early.
 */
async function saturation (setups: Setup[]): Promise<void> {
  const steps = new Map<System, StepResult[]>(setups.map(s => [s.spec.system as System, []]))
  // Per system: the highest rate within the limit so far, and the lowest over it.
  const bounds = new Map<System, { pass: number, fail: number | null, next: number | null, bisections: number }>(
    setups.map(s => [s.spec.system as System, { pass: 0, fail: null, next: CFG.satRates[0], bisections: 0 }]))
  const measure = async (setup: Setup, rate: number): Promise<StepResult> => {
    const system = setup.spec.system as System
    await sleep(200)
    let st = await step(setup, rate, CFG.satMs, '-sat')
    // Over the limit: run the step again, and once more when other processes disturbed the rerun.
    for (let attempt = 1; st.p99 > P99_LIMIT_MS && (attempt === 1 || (attempt === 2 && st.otherCpuPct > OTHER_CPU_LIMIT_PCT)); attempt++) {
      log(`  saturation ${NAMES[system]} R=${rate}: p99 ${fmt(st.p99, 1)} ms (other CPU ${fmt(st.otherCpuPct, 0)}%); running the step again`)
      await sleep(500)
      st = await step(setup, rate, CFG.satMs, `-sat-again${attempt}`)
    }
    if (process.env.BENCH_DEBUG !== undefined && st.pluginStats != null) log(`  stats after the step: ${JSON.stringify(st.pluginStats)}`)
    log(`  saturation ${NAMES[system]} R=${rate}: target ${fmt(st.targetMsgsPerSec, 0)} msgs/s, delivered ${fmt(st.deliveredPerSec, 0)}, p99 ${fmt(st.p99, 1)} ms, loss ${fmt(st.lossPct, 1)}%, server CPU ${serverCpu(st)}, other CPU ${fmt(st.otherCpuPct, 0)}%`)
    return st
  }
  // Rates double until a system passes the limit, then two bisections between the last rate
  // within it and the first over it; the systems take turns at every step.
  for (;;) {
    const pending = setups.filter(s => bounds.get(s.spec.system as System)?.next !== null)
    if (pending.length === 0) break
    for (const setup of pending) {
      const system = setup.spec.system as System
      const b = bounds.get(system) as { pass: number, fail: number | null, next: number | null, bisections: number }
      const rate = b.next as number
      const st = await measure(setup, rate)
      ;(steps.get(system) as StepResult[]).push(st)
      if (!within(st)) b.fail = rate
      else b.pass = rate
      if (b.fail === null) {
        // Past the listed rates the ramp goes on doubling until the system fails (up to SAT_MAX_RATE).
        const i = CFG.satRates.indexOf(rate)
        b.next = i >= 0 && i + 1 < CFG.satRates.length ? CFG.satRates[i + 1] : rate * 2 <= SAT_MAX_RATE ? rate * 2 : null
      } else if (b.bisections < 2 && b.pass > 0 && b.fail - b.pass > 1) {
        b.bisections++
        b.next = Math.round((b.pass + b.fail) / 2)
      } else {
        b.next = null
      }
    }
  }
  for (const [system, list] of steps) {
    const ok = list.filter(within)
    const best = ok.reduce<StepResult | null>((b, st) => b === null || st.deliveredPerSec > b.deliveredPerSec ? st : b, null)
    results.saturation[system] = {
      instances: CFG.satInstances,
      steps: list.map(st => strip(st)),
      bestDeliveredPerSec: best?.deliveredPerSec ?? 0,
      bestRate: best?.rate ?? null,
      // Whether the limit was reached: otherwise the best figure is a lower bound.
      limitReached: list.some(st => !within(st)),
      // Steps that decided the figure (the best one, the first over the limit) disturbed by other load.
      disturbed: [best, list.find(st => !within(st))].some(st => st != null && st.otherCpuPct > OTHER_CPU_LIMIT_PCT)
    }
  }
}

/**
 * A saturation step passes with p99 within the limit and (nearly) every message delivered: a
 * system that conflates (skips a job's intermediate steps for a socket that is behind) is not
 * credited with the messages it skipped.
 */
function within (st: StepResult): boolean {
  return st.p99 <= P99_LIMIT_MS && st.lossPct <= MAX_LOSS_PCT
}

async function redisWork (): Promise<void> {
  results.redisWork = []
  const run = async (system: System | 'none', n: number): Promise<void> => {
    await withSetups([{ system, instances: n, topology: 'one', jobs: CFG.redisJobs, perJob: 1, label: `redis-${system}-${n}` }], async ([setup]) => {
      const r = await step(setup, CFG.redisRate, CFG.redisMs)
      results.redisWork.push({ system, instances: n, events: r.events, commandsPerEvent: r.redis.commandsPerEvent, bytesOutPerEvent: r.redis.bytesOutPerEvent, byCommand: r.redis.byCommand, netIn: r.redis.netIn, p99: r.p99, received: r.received, expected: r.expected })
      log(`redis work ${NAMES[system]} ×${n}: ${fmt(r.redis.commandsPerEvent, 2)} commands/event, ${fmt(r.redis.bytesOutPerEvent, 0)} bytes out/event (${r.events} events)`)
    })
  }
  await run('none', 0)
  for (const system of CFG.redisSystems) {
    for (const n of CFG.redisInstances) await run(system, n)
  }
  const base = results.redisWork.find((r: any) => r.system === 'none')
  for (const r of results.redisWork) {
    r.consumerCommandsPerEvent = r.commandsPerEvent - base.commandsPerEvent
    r.consumerBytesOutPerEvent = r.bytesOutPerEvent - base.bytesOutPerEvent
  }
}

async function idle (): Promise<void> {
  results.idle = {}
  for (const system of MEASURED) {
    const queue = `idle${setupNo++}`
    const set = `idle-${system}`
    const server = spawnServer(system, `idle-${system}`, { queue })
    try {
      const { port } = await server.ready
      const { jobIds } = await driver.call<{ jobIds: string[] }>('init', { set, redisUrl: redis?.url, queue, jobs: CFG.idleJobs, owner: OWNER, activate: false, emitter: false })
      const subs = (count: number): Array<{ url: string, jobIndex: number, jobId: string, instance?: number }> =>
        Array.from({ length: count }, (_, k) => ({ url: socketUrl(system, port, jobIds[k % CFG.idleJobs]), jobIndex: k % CFG.idleJobs, jobId: jobIds[k % CFG.idleJobs] }))
      // Warm up first: code loaded and compiled on the first connections is not a per-socket cost.
      const warm = subs(200)
      await Promise.all(clients.map(async (c, i) => await c.call('open', { set: `${set}-warm`, system, owner: OWNER, subs: warm.filter((_, k) => k % clients.length === i) })))
      await Promise.all(clients.map(async c => await c.call('closeAll', { set: `${set}-warm` })))
      await sleep(500)
      // The snapshot first: writing one grows the RSS, which would otherwise count as the sockets'.
      if (PROFILE) await server.call('heapSnapshot', join(resultsDir, `idle-${system}-before.heapsnapshot`), 60_000)
      const before = await server.call('memory')
      const all = subs(CFG.idleSockets)
      const t0 = Date.now()
      await Promise.all(clients.map(async (c, i) => await c.call('open', { set, system, owner: OWNER, subs: all.filter((_, k) => k % clients.length === i), parallel: 32 }, 120_000)))
      const openMs = Date.now() - t0
      await sleep(1_000)
      const after = await server.call('memory')
      if (PROFILE) await server.call('heapSnapshot', join(resultsDir, `idle-${system}-after.heapsnapshot`), 60_000)
      const r = {
        sockets: CFG.idleSockets,
        jobs: CFG.idleJobs,
        openMs,
        rssBeforeMB: before.rss / 2 ** 20,
        rssAfterMB: after.rss / 2 ** 20,
        rssPerSocketKB: (after.rss - before.rss) / CFG.idleSockets / 1024,
        heapPerSocketKB: (after.heapUsed - before.heapUsed) / CFG.idleSockets / 1024
      }
      results.idle[system] = r
      log(`idle ${NAMES[system]}: ${r.sockets} sockets in ${openMs} ms, RSS ${fmt(r.rssPerSocketKB, 2)} KB/socket, heap ${fmt(r.heapPerSocketKB, 2)} KB/socket`)
    } finally {
      await Promise.all(clients.map(async c => await c.call('closeAll', { set }).catch(() => {})))
      await driver.call('finish', { set }).catch(() => {})
      await server.stop()
      await redis?.flush()
    }
  }
}

/** Streams a generated multipart body of `bytes` to `url`; resolves with status and seconds. */
async function postGenerated (url: string, bytes: number): Promise<{ status: number, seconds: number, body: string }> {
  const boundary = `----jpbench${randomBytes(12).toString('hex')}`
  const head = Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n`)
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`)
  const chunk = randomBytes(256 * 1024)
  const t0 = performance.now()
  return await new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'content-length': head.length + bytes + tail.length, 'x-owner': OWNER } }, (res) => {
      let body = ''
      res.on('data', (d) => { body += String(d) })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, seconds: (performance.now() - t0) / 1000, body }))
    })
    req.on('error', reject)
    let left = bytes
    const pump = (): void => {
      while (left > 0) {
        const part = left >= chunk.length ? chunk : chunk.subarray(0, left)
        left -= part.length
        if (!req.write(part)) {
          req.once('drain', pump)
          return
        }
      }
      req.end(tail)
    }
    req.write(head)
    pump()
  })
}

async function upload (): Promise<void> {
  results.upload = {}
  // Alternating order over rounds, best throughput and worst growth kept: the disk's write-back
  // of one upload must not be charged to the next one.
  const order: Array<'plugin' | 'plain'> = []
  for (let i = 0; i < CFG.uploadRounds; i++) order.push(...(i % 2 === 0 ? ['plain', 'plugin'] as const : ['plugin', 'plain'] as const))
  for (const kind of order) {
    const server = spawnServer(kind, `upload-${kind}`, { queue: 'upload' })
    try {
      const { port } = await server.ready
      const url = `http://127.0.0.1:${port}${kind === 'plugin' ? '/bench/upload' : '/upload'}`
      // A small warm-up upload so that first-use allocations are not counted as growth.
      await postGenerated(url, 1024 * 1024)
      const before = await server.call('memory')
      await server.call('sampleStart')
      const res = await postGenerated(url, CFG.uploadBytes)
      const peak = await server.call<number>('sampleStop')
      if (res.status !== 202) throw new Error(`upload to ${kind} answered ${res.status}: ${res.body.slice(0, 200)}`)
      const r = { bytes: CFG.uploadBytes, seconds: res.seconds, mbPerSec: CFG.uploadBytes / 2 ** 20 / res.seconds, rssBeforeMB: before.rss / 2 ** 20, rssPeakMB: peak / 2 ** 20, rssGrowthMB: (peak - before.rss) / 2 ** 20 }
      const prev = results.upload[kind]
      results.upload[kind] = prev === undefined
        ? { ...r, rounds: [r] }
        : { ...(r.mbPerSec > prev.mbPerSec ? r : prev), rssGrowthMB: Math.max(prev.rssGrowthMB, r.rssGrowthMB), rounds: [...prev.rounds, r] }
      log(`upload ${kind}: ${fmt(r.mbPerSec, 0)} MB/s, RSS growth ${fmt(r.rssGrowthMB, 1)} MB`)
    } finally {
      await server.stop()
      rmSync(join(tmp, `up-upload-${kind}`), { recursive: true, force: true })
      await redis?.flush()
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Report

interface Target { name: string, ours: number, peer: number | null, ratio: number, limit: string, pass: boolean, note?: string }

function targets (who: 'plugin' | 'candidate' = 'plugin'): Target[] {
  const out: Target[] = []
  const fan = (system: System, n: number): any => results.fanout?.find((r: any) => r.system === system && r.instances === n)
  const N = CFG.satInstances
  const ours = fan(who, N)
  const floor = fan('floor', N)
  if (ours !== undefined && floor !== undefined) {
    const note = `median p99 of ${ours.cleanRounds as number} round(s)${ours.allRoundsDisturbed === true ? ', every round disturbed by other load' : ' without outside load'}; pooled over all rounds ${fmt(ours.p99, 2)} vs ${fmt(floor.p99, 2)} ms`
    out.push({ name: `fan-out p99 latency at ${N} instances (ms)`, ours: ours.p99Clean, peer: floor.p99Clean, ratio: ours.p99Clean / floor.p99Clean, limit: '≤ 1.5 × floor', pass: ours.p99Clean <= 1.5 * floor.p99Clean, note })
  }
  const sat = results.saturation ?? {}
  if (sat[who] !== undefined && sat.sio !== undefined) {
    const ratio = sat[who].bestDeliveredPerSec / sat.sio.bestDeliveredPerSec
    const notes = [
      ...(sat[who].limitReached === true ? [] : ['plugin did not reach its limit in the rates tried: a lower bound']),
      ...(sat[who].disturbed === true || sat.sio.disturbed === true ? [`deciding steps disturbed by other load (> ${OTHER_CPU_LIMIT_PCT}% of the machine): run again on a quiet machine`] : [])
    ]
    out.push({ name: `saturation msgs/s with p99 ≤ ${P99_LIMIT_MS} ms, ≥ ${100 - MAX_LOSS_PCT}% delivered, at ${N} instances`, ours: sat[who].bestDeliveredPerSec, peer: sat.sio.bestDeliveredPerSec, ratio, limit: '≥ 1.5 × socket.io', pass: ratio >= 1.5, note: notes.length > 0 ? notes.join('; ') : undefined })
  }
  if (sat[who] !== undefined && sat.limit !== undefined) {
    const vsLimit = sat[who].bestDeliveredPerSec / sat.limit.bestDeliveredPerSec
    out.push({ name: `saturation msgs/s at ${N} instances, next to the limit (prebuilt frames, batched per turn)`, ours: sat[who].bestDeliveredPerSec, peer: sat.limit.bestDeliveredPerSec, ratio: vsLimit, limit: 'report', pass: true, note: sat.limit.limitReached === true ? undefined : 'the limit did not fail in the rates tried: a lower bound' })
  }
  if (sat[who] !== undefined && sat.floor !== undefined) {
    const vsFloor = sat[who].bestDeliveredPerSec / sat.floor.bestDeliveredPerSec
    out.push({ name: `saturation msgs/s at ${N} instances, next to the floor`, ours: sat[who].bestDeliveredPerSec, peer: sat.floor.bestDeliveredPerSec, ratio: vsFloor, limit: '≥ 0.9 × floor', pass: vsFloor >= 0.9 })
  }
  for (const n of new Set([1, N])) {
    const mine = fan(who, n)
    if (mine === undefined) continue
    const base = fan('floor', n)
    if (base !== undefined) {
      const ratio = mine.cpuPer10k.servers / base.cpuPer10k.servers
      out.push({ name: `server CPU s per 10k delivered (fan-out, ${n as number} instance(s))`, ours: mine.cpuPer10k.servers, peer: base.cpuPer10k.servers, ratio, limit: '≤ 1.1 × floor', pass: ratio <= 1.1 })
    }
    // The issue's Socket.IO peer is its servers plus the one QueueEvents relay that feeds them.
    const relayed = fan('sioRelay', n)
    if (relayed !== undefined) {
      const ratio = mine.cpuPer10k.servers / relayed.cpuPer10k.servers
      const note = `socket.io servers ${fmt(relayed.cpuPer10k.servers - relayed.cpuPer10k.relay, 3)} + relay ${fmt(relayed.cpuPer10k.relay, 3)} s/10k`
      out.push({ name: `server CPU s per 10k delivered (fan-out, ${n as number} instance(s))`, ours: mine.cpuPer10k.servers, peer: relayed.cpuPer10k.servers, ratio, limit: '≤ 0.6 × socket.io servers + its relay', pass: ratio <= 0.6, note })
    }
  }
  for (const r of (results.tail ?? []).filter((x: any) => x.system === who)) {
    const rate = CFG.tailJobs * CFG.tailPerJob * CFG.tailRate
    const name = `p99 at ${rate} msgs/s, ${r.instances as number} instance(s), median of ${r.rounds as number} rounds (ms)`
    const note = (peer: any): string => `median over undisturbed rounds ${fmt(r.p99Clean, 2)} vs ${fmt(peer.p99Clean, 2)} ms${r.allRoundsDisturbed === true ? ', every round disturbed by other load' : ''}`
    const peer = results.tail.find((x: any) => x.system === 'sio' && x.instances === r.instances)
    if (peer !== undefined) out.push({ name, ours: r.p99Median, peer: peer.p99Median, ratio: r.p99Median / peer.p99Median, limit: '≤ 1 × socket.io', pass: r.p99Median <= peer.p99Median, note: note(peer) })
    const relayed = results.tail.find((x: any) => x.system === 'sioRelay' && x.instances === r.instances)
    if (relayed !== undefined) out.push({ name, ours: r.p99Median, peer: relayed.p99Median, ratio: r.p99Median / relayed.p99Median, limit: '≤ 1 × socket.io+relay', pass: r.p99Median <= relayed.p99Median, note: note(relayed) })
  }
  for (const r of (results.few ?? []).filter((x: any) => x.system === who)) {
    const floor = results.few.find((x: any) => x.system === 'floor' && x.instances === r.instances && x.perJob === r.perJob)
    if (floor === undefined) continue
    const layout = `${CFG.fewJobs} jobs × ${r.perJob as number} socket(s) × ${CFG.fewRate}/s, ${r.instances as number} instance(s)`
    const cpu = r.cpuPer10k.servers / floor.cpuPer10k.servers
    out.push({ name: `server CPU s per 10k delivered (${layout})`, ours: r.cpuPer10k.servers, peer: floor.cpuPer10k.servers, ratio: cpu, limit: '≤ 1.0 × floor', pass: cpu <= 1.0 })
    const rc = r.cpuPer10k.redis / floor.cpuPer10k.redis
    out.push({ name: `Redis CPU s per 10k delivered (${layout})`, ours: r.cpuPer10k.redis, peer: floor.cpuPer10k.redis, ratio: rc, limit: '≤ 1.1 × floor', pass: rc <= 1.1 })
  }
  if (results.idle?.[who] !== undefined && results.idle?.sio !== undefined) {
    const ratio = results.idle[who].rssPerSocketKB / results.idle.sio.rssPerSocketKB
    out.push({ name: `RSS per idle socket (KB, ${CFG.idleSockets} sockets)`, ours: results.idle[who].rssPerSocketKB, peer: results.idle.sio.rssPerSocketKB, ratio, limit: '≤ 0.9 × socket.io', pass: ratio <= 0.9 })
  }
  if (who === 'candidate') return out.map(t => ({ ...t, name: `candidate: ${t.name}` }))
  const rw = (system: string, n: number): any => results.redisWork?.find((r: any) => r.system === system && r.instances === n)
  const lo = Math.min(...CFG.redisInstances)
  const hi = Math.max(...CFG.redisInstances)
  if (rw('plugin', lo) !== undefined && rw('plugin', hi) !== undefined && rw('floor', hi) !== undefined) {
    const growth = (s: string, key: string): number => rw(s, hi)[key] / rw(s, lo)[key]
    const oursBytes = growth('plugin', 'consumerBytesOutPerEvent')
    const oursCmds = growth('plugin', 'consumerCommandsPerEvent')
    const floorBytes = growth('floor', 'consumerBytesOutPerEvent')
    const floorCmds = growth('floor', 'consumerCommandsPerEvent')
    out.push({ name: `Redis bytes out per event, ${hi} vs ${lo} instance(s), one watched (growth)`, ours: oursBytes, peer: floorBytes, ratio: oursBytes / floorBytes, limit: 'plugin ≤ 1.25×, floor grows', pass: oursBytes <= 1.25 && floorBytes > 1.5 })
    out.push({ name: `Redis commands per event, ${hi} vs ${lo} instance(s), one watched (growth)`, ours: oursCmds, peer: floorCmds, ratio: oursCmds / floorCmds, limit: 'plugin ≤ 1.25×, floor grows', pass: oursCmds <= 1.25 && floorCmds > 1.5 })
  }
  if (results.upload?.plugin !== undefined) {
    const mb = results.upload.plugin.rssGrowthMB
    out.push({ name: `upload ${CFG.uploadBytes / 2 ** 20} MB: server RSS growth (MB)`, ours: mb, peer: results.upload.plain?.rssGrowthMB ?? null, ratio: mb / (results.upload.plain?.rssGrowthMB ?? NaN), limit: '< 50 MB', pass: mb < 50 })
  }
  return out
}

const RELAY_CPU = `${NAMES.sioRelay}: "srv CPU" = its socket.io servers + its relay, "of it relay" = the relay's share`
/** The relay's CPU per 10k delivered, for the one system that has a relay. */
const relayShare = (r: any): string => r.cpu?.relay > 0 ? fmt(r.cpuPer10k.relay, 3) : ''

function report (): string {
  const parts: string[] = []
  const m = results.machine
  parts.push(`fastify-job-progress bench (${QUICK ? 'quick' : 'full'}) — ${m.cores} cores (${m.cpuModel}), node ${m.node}, redis ${m.redis}, load average ${m.loadBefore.map((x: number) => x.toFixed(1)).join(' ')} at start; all figures from this one run`)
  if (results.fanout !== undefined) {
    parts.push(table(`Fan-out: ${CFG.jobs} jobs × ${CFG.perJob} sockets, ${CFG.rate} updates/s per job; systems take turns, ${CFG.rounds} rounds × ${CFG.fanoutMs / 1000} s; a round is disturbed when other processes used > ${OTHER_CPU_LIMIT_PCT}% of the machine; "p99 clean" = median over undisturbed rounds; ${RELAY_CPU}`,
      ['system', 'inst', 'msgs/s', 'p50 ms', 'p99 ms', 'p99 rounds (* disturbed)', 'p99 clean', 'max ms', 'delivered', 'per socket min-max/sent', 'short sockets', 'dup/ooo', 'srv CPU s/10k', 'of it relay', 'drv CPU s/10k', 'redis CPU s/10k', 'srv writes/msg', 'redis cmd/ev', 'redis B/ev', 'other CPU %'],
      results.fanout.map((r: any) => [NAMES[r.system as System], r.instances, fmt(r.deliveredPerSec, 0), fmt(r.p50, 2), fmt(r.p99, 2), r.p99Rounds.map((x: number, i: number) => fmt(x, 1) + (r.roundsDisturbed[i] === true ? '*' : '')).join('/'), fmt(r.p99Clean, 2), fmt(r.max, 1), `${r.received}/${r.expected}`, `${r.perSocket.minReceived as number}-${r.perSocket.maxReceived as number}/${r.perSocket.maxExpected as number}`, r.socketsShort, `${r.duplicates}/${r.outOfOrder}`, fmt(r.cpuPer10k.servers, 3), relayShare(r), fmt(r.cpuPer10k.driver, 3), fmt(r.cpuPer10k.redis, 3), fmt(r.serverPerMsg.writeCalls, 2), fmt(r.redis.commandsPerEvent, 2), fmt(r.redis.bytesOutPerEvent, 0), fmt(r.otherCpuPct, 0)])))
  }
  if (results.tail !== undefined) {
    parts.push(table(`Tail latency: ${CFG.tailJobs} jobs × ${CFG.tailPerJob} sockets, ${CFG.tailRate} updates/s per job (${CFG.tailJobs * CFG.tailPerJob * CFG.tailRate} msgs/s); systems take turns, ${CFG.tailRounds} rounds × ${CFG.tailMs / 1000} s; "p99 median" = median of the rounds' p99; ${RELAY_CPU}`,
      ['system', 'inst', 'msgs/s', 'p50 ms', 'p99 rounds (* disturbed)', 'p99 median', 'p99 clean', 'max ms', 'delivered', 'srv CPU s/10k', 'of it relay', 'redis CPU s/10k', 'other CPU %'],
      results.tail.map((r: any) => [NAMES[r.system as System], r.instances, fmt(r.deliveredPerSec, 0), fmt(r.p50, 2), r.p99Rounds.map((x: number, i: number) => fmt(x, 1) + (r.roundsDisturbed[i] === true ? '*' : '')).join('/'), fmt(r.p99Median, 2), fmt(r.p99Clean, 2), fmt(r.max, 1), `${r.received}/${r.expected}`, fmt(r.cpuPer10k.servers, 3), relayShare(r), fmt(r.cpuPer10k.redis, 3), fmt(r.otherCpuPct, 0)])))
  }
  if (results.few !== undefined) {
    const floorOf = (r: any): any => results.few.find((x: any) => x.system === 'floor' && x.instances === r.instances && x.perJob === r.perJob)
    parts.push(table(`Few watchers per job: ${CFG.fewJobs} jobs × 1 or 2 sockets, ${CFG.fewRate} updates/s per job; systems take turns, ${CFG.fewRounds} rounds × ${CFG.fewMs / 1000} s; "× floor" = ratio to the floor at the same layout and instance count; ${RELAY_CPU}`,
      ['system', 'sockets/job', 'inst', 'msgs/s', 'p50 ms', 'p99 median', 'delivered', 'srv CPU s/10k', 'of it relay', '× floor', 'redis CPU s/10k', '× floor', 'redis cmd/ev', 'other CPU %', 'commands per event'],
      results.few.map((r: any) => [NAMES[r.system as System], r.perJob, r.instances, fmt(r.deliveredPerSec, 0), fmt(r.p50, 2), fmt(r.p99Median, 2), `${r.received}/${r.expected}`, fmt(r.cpuPer10k.servers, 3), relayShare(r), fmt(r.cpuPer10k.servers / floorOf(r)?.cpuPer10k.servers, 2), fmt(r.cpuPer10k.redis, 3), fmt(r.cpuPer10k.redis / floorOf(r)?.cpuPer10k.redis, 2), fmt(r.redis.commandsPerEvent, 2), fmt(r.otherCpuPct, 0),
        Object.entries<number>(r.redis.byCommand).sort((a, b) => b[1] - a[1]).filter(([, n]) => n / r.events >= 0.02).map(([c, n]) => `${c}:${fmt(n / r.events, 2)}`).join(' ')])))
  }
  if (results.publishAlone !== undefined) {
    const pa = results.publishAlone
    const one = results.few.find((x: any) => x.system === 'floor' && x.instances === 1 && x.perJob === 1)
    parts.push(`One PUBLISH per event alone (${CFG.fewJobs} channels, one subscriber, ${CFG.fewJobs * CFG.fewRate} msgs/s, from a script in 10 ms batches): Redis CPU ${fmt(pa.cpuPer10k, 3)} s per 10k (rounds ${pa.rounds.map((x: number) => fmt(x, 3)).join('/')})${one !== undefined ? `; the floor at 1 socket per job plus it: ${fmt(one.cpuPer10k.redis + pa.cpuPer10k, 3)} s (${fmt((one.cpuPer10k.redis + pa.cpuPer10k) / one.cpuPer10k.redis, 2)} × the floor), the least a relay to per-job channels can cost` : ''}`)
  }
  if (results.saturation !== undefined && Object.keys(results.saturation).length > 0) {
    const rows: Array<Array<string | number>> = []
    for (const [system, s] of Object.entries<any>(results.saturation)) {
      for (const st of s.steps) rows.push([NAMES[system as System], st.rate, fmt(st.targetMsgsPerSec, 0), fmt(st.deliveredPerSec, 0), fmt(st.p50, 2), fmt(st.p99, 1), fmt(st.lossPct, 1), fmt(st.cpuPer10k.servers, 3), relayShare(st), fmt(st.driverLateMs, 0), fmt(st.otherCpuPct, 0), within(st) ? '' : '> limit'])
      rows.push([`  → ${NAMES[system as System]} best`, s.bestRate ?? '-', '', fmt(s.bestDeliveredPerSec, 0), '', '', '', '', '', '', '', [s.limitReached === true ? '' : '(limit not reached)', s.disturbed === true ? '(disturbed)' : ''].join(' ').trim()])
    }
    parts.push(table(`Saturation at ${CFG.satInstances} instances: R doubles until p99 > ${P99_LIMIT_MS} ms, then two bisections (${CFG.satMs / 1000} s per step, systems take turns); ${RELAY_CPU}`,
      ['system', 'R/job', 'target msgs/s', 'delivered/s', 'p50 ms', 'p99 ms', 'loss %', 'srv CPU s/10k', 'of it relay', 'driver late ms', 'other CPU %', ''], rows))
  }
  if (results.redisWork !== undefined) {
    parts.push(table(`Redis work per progress event, all sockets on ONE instance (${CFG.redisJobs} jobs, ${CFG.redisRate}/s each, ${CFG.redisMs / 1000} s); "consumer" = minus the driver-only run`,
      ['system', 'inst', 'events', 'cmds/ev', 'consumer cmds/ev', 'bytes out/ev', 'consumer bytes/ev', 'commands per event'],
      results.redisWork.map((r: any) => [NAMES[r.system as System | 'none'], r.instances, r.events, fmt(r.commandsPerEvent, 2), fmt(r.consumerCommandsPerEvent, 2), fmt(r.bytesOutPerEvent, 0), fmt(r.consumerBytesOutPerEvent, 0),
        Object.entries<number>(r.byCommand).sort((a, b) => b[1] - a[1]).filter(([, n]) => n / r.events >= 0.05).map(([c, n]) => `${c}:${fmt(n / r.events, 2)}`).join(' ')])))
  }
  if (results.idle !== undefined) {
    parts.push(table('Idle sockets: RSS after GC, one server process',
      ['system', 'sockets', 'jobs', 'open s', 'RSS before MB', 'RSS after MB', 'RSS KB/socket', 'heap KB/socket'],
      Object.entries<any>(results.idle).map(([s, r]) => [NAMES[s as System], r.sockets, r.jobs, fmt(r.openMs / 1000, 1), fmt(r.rssBeforeMB, 1), fmt(r.rssAfterMB, 1), fmt(r.rssPerSocketKB, 2), fmt(r.heapPerSocketKB, 2)])))
  }
  if (results.upload !== undefined) {
    parts.push(table(`Upload (generated multipart body, one request; best of ${CFG.uploadRounds} for MB/s, worst for growth)`,
      ['route', 'MB', 's', 'MB/s', 'RSS before MB', 'RSS peak MB', 'RSS growth MB'],
      Object.entries<any>(results.upload).map(([k, r]) => [k === 'plugin' ? 'plugin upload route' : 'plain @fastify/multipart → disk', r.bytes / 2 ** 20, fmt(r.seconds, 2), fmt(r.mbPerSec, 0), fmt(r.rssBeforeMB, 1), fmt(r.rssPeakMB, 1), fmt(r.rssGrowthMB, 1)])))
  }
  if (results.finalCheck !== undefined) {
    const short = (results.finalCheck as any[]).filter(c => c.closedWith1000 < c.sockets)
    parts.push(`\nFinal message: ${sum(results.finalCheck.map((c: any) => c.closedWith1000))}/${sum(results.finalCheck.map((c: any) => c.sockets))} plugin sockets got the final message and a 1000 close within 6 s of their jobs completing${short.length > 0 ? ` (short: ${short.map(c => `${c.setup as string} ${c.closedWith1000 as number}/${c.sockets as number} ${JSON.stringify(c.closeCodes)}`).join('; ')})` : ''}`)
  }
  const t = results.targets as Target[]
  parts.push(table('Targets (ratios within this run)',
    ['target', 'plugin', 'peer', 'ratio', 'goal', 'result'],
    t.map(x => [x.name, fmt(x.ours, 3), fmt(x.peer, 3), fmt(x.ratio, 2), x.limit, (x.pass ? 'PASS' : 'MISS') + (x.note !== undefined ? ` (${x.note})` : '')])))
  return parts.join('\n') + '\n'
}

function versionOf (pkg: string): string {
  try {
    return JSON.parse(readFileSync(join(ROOT, 'node_modules', pkg, 'package.json'), 'utf8')).version
  } catch {
    return 'unknown'
  }
}

// ---------------------------------------------------------------------------------------------

let deadline: NodeJS.Timeout | undefined

async function main (): Promise<void> {
  deadline = setTimeout(() => {
    log(`the bench ran past ${DEADLINE_MS / 1000} s: giving up`)
    cleanupSync()
    process.exit(2)
  }, DEADLINE_MS)
  results.machine = {
    cores: cpus().length,
    cpuModel: cpus()[0]?.model ?? 'unknown',
    memoryGB: round(totalmem() / 2 ** 30, 1),
    loadBefore: loadavg(),
    node: process.version,
    redis: BenchRedis.version(),
    openFileLimit: openFileLimit(),
    packages: Object.fromEntries(['fastify', 'bullmq', 'ioredis', 'ws', '@fastify/websocket', '@fastify/multipart', 'socket.io', 'socket.io-client', '@socket.io/redis-adapter', '@socket.io/redis-emitter'].map(p => [p, versionOf(p)])),
    plugin: JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')).version
  }
  results.mode = QUICK ? 'quick' : 'full'
  results.config = CFG
  results.startedAt = new Date().toISOString()
  redis = await BenchRedis.start()
  log(`redis-server ${results.machine.redis} on port ${redis.port}; ${results.machine.cores} cores; load average ${loadavg().map(x => x.toFixed(1)).join(' ')}`)
  driver = new Child('bench/driver.ts', [], { label: 'driver' })
  clients = Array.from({ length: CLIENT_PROCS }, (_, i) => new Child('bench/clients.ts', [], { label: `clients-${i}`, manyFiles: true }))
  await Promise.all([driver.ready, ...clients.map(async c => await c.ready)])

  const want = (name: string): boolean => ONLY === undefined || ONLY.includes(name)
  if (want('fanout')) await fanout()
  if (want('tail')) await tail()
  if (want('few')) await few()
  if (want('redis')) await redisWork()
  if (want('idle')) await idle()
  if (want('upload')) await upload()

  results.targets = [...targets(), ...(CANDIDATE !== undefined ? targets('candidate') : [])]
  results.machine.loadAfter = loadavg()
  results.durationSeconds = (Date.now() - started) / 1000
  const text = report()
  process.stdout.write(text)
  if (ONLY === undefined && CANDIDATE === undefined) {
    const json = JSON.stringify(results, (_k, v) => typeof v === 'number' && !Number.isInteger(v) ? round(v, 4) : v, 2) + '\n'
    writeFileSync(join(resultsDir, 'latest.json'), json)
    // The last run of each mode too, so that a quick run does not hide the last full one.
    writeFileSync(join(resultsDir, `latest-${results.mode as string}.json`), json)
    writeFileSync(join(resultsDir, `latest-${results.mode as string}.txt`), text)
  }
  log(`done in ${fmt(results.durationSeconds, 1)} s`)
}

main()
  .catch((err: Error) => {
    log(`bench failed: ${err.stack ?? String(err)}`)
    process.exitCode = 1
  })
  .finally(async () => {
    clearTimeout(deadline)
    await Promise.all([driver, ...clients].filter(c => c !== undefined).map(async c => await c.stop(2_000).catch(() => {})))
    await redis?.stop().catch(() => {})
    cleanupSync()
  })
