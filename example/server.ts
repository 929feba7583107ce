import { spawn, spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { connect } from 'node:net'
import { Cluster, type Redis } from 'ioredis'
import { createJobWorker, DiskStorage } from '../lib/index'
import { buildApp, CLUSTER_PREFIX, KINDS } from './app'
import { demoProcessor } from './processor'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

/**
 * The example: `ROLE=all` (default) serves the API and runs the workers in one process;
 * `ROLE=api` and `ROLE=worker` split them, for several instances behind a load balancer.
 */
const env = process.env
const ROLE = env.ROLE ?? 'all'
const PORT = Number(env.PORT ?? 8001)
const HOST = env.HOST ?? '127.0.0.1'
const ITEM_DELAY_MS = Number(env.ITEM_DELAY_MS ?? 50)
const UPLOAD_DIR = env.UPLOAD_DIR ?? join(tmpdir(), 'fastify-job-progress')
// BullMQ notices a job whose worker died after its lock expires and the next stall check runs
// (30 s each by default); a shorter interval (the lock lasts twice as long) retries it sooner.
const STALLED_INTERVAL_MS = env.STALLED_INTERVAL_MS === undefined ? undefined : Number(env.STALLED_INTERVAL_MS)
// At SIGTERM, uploads still sending after this long are answered 503 and every connection of the
// plugin's routes still open is closed (the plugin's `uploads.shutdownGraceMs`, 10 s by default).
const SHUTDOWN_GRACE_MS = env.SHUTDOWN_GRACE_MS === undefined ? undefined : Number(env.SHUTDOWN_GRACE_MS)

function fail (message: string): never {
  process.stderr.write(message.trimEnd() + '\n')
  process.exit(1)
}

async function reachable (port: number, host = '127.0.0.1'): Promise<boolean> {
  return await new Promise(resolve => {
    const socket = connect(port, host)
    socket.setTimeout(1000)
    socket.once('connect', () => { socket.destroy(); resolve(true) })
    socket.once('error', () => resolve(false))
    socket.once('timeout', () => { socket.destroy(); resolve(false) })
  })
}

/** REDIS_URL, or the default when something answers there, or a private redis-server. */
async function redisUrl (): Promise<string> {
  if (env.REDIS_URL !== undefined && env.REDIS_URL !== '') return env.REDIS_URL
  if (await reachable(6379)) return 'redis://127.0.0.1:6379'
  if (spawnSync('redis-server', ['--version']).status !== 0) {
    // The same tool check `npm test` runs: installs redis-server with apt when it can, or names
    // the command to run.
    const script = join(__dirname, '..', 'scripts', 'ensure-tools.mjs')
    process.stdout.write('No Redis at 127.0.0.1:6379 and no redis-server installed: getting one for this example.\n')
    if (!existsSync(script) || spawnSync(process.execPath, [script, 'redis-server'], { stdio: 'inherit' }).status !== 0) {
      fail('Start a Redis and point REDIS_URL at it (REDIS_URL=redis://host:6379 npm start), or install redis-server.')
    }
  }
  const port = 6390 + Math.floor(Math.random() * 100)
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' })
  process.on('exit', () => child.kill())
  for (let i = 0; i < 50 && !await reachable(port); i++) await new Promise(resolve => setTimeout(resolve, 100))
  process.stdout.write(`No Redis at 127.0.0.1:6379: started a private redis-server on port ${port} (stops with this process).\n`)
  return `redis://127.0.0.1:${port}`
}

/** REDIS_CLUSTER_NODES (`host:port,host:port`): seed nodes of a Redis Cluster, used instead of REDIS_URL. */
function redisCluster (): Cluster | undefined {
  const seeds = env.REDIS_CLUSTER_NODES
  if (seeds === undefined || seeds.trim() === '') return undefined
  const nodes = seeds.split(',').map(seed => {
    const m = /^\s*([^:\s]+):(\d+)\s*$/.exec(seed)
    if (m === null) fail(`REDIS_CLUSTER_NODES: expected host:port seeds separated by commas, got "${seed}"`)
    return { host: m[1], port: Number(m[2]) }
  })
  const cluster = new Cluster(nodes, { shardedSubscribers: true, redisOptions: { maxRetriesPerRequest: null } })
  cluster.on('error', (err: Error) => process.stderr.write(`redis cluster: ${err.message}\n`))
  return cluster
}

async function main (): Promise<void> {
  if (!['all', 'api', 'worker'].includes(ROLE)) fail(`ROLE must be all, api or worker (got "${ROLE}")`)
  if (STALLED_INTERVAL_MS !== undefined && !(STALLED_INTERVAL_MS >= 100)) fail(`STALLED_INTERVAL_MS must be a number of milliseconds, at least 100 (got "${env.STALLED_INTERVAL_MS}")`)
  if (SHUTDOWN_GRACE_MS !== undefined && !(Number.isInteger(SHUTDOWN_GRACE_MS) && SHUTDOWN_GRACE_MS >= 0)) fail(`SHUTDOWN_GRACE_MS must be a whole number of milliseconds (got "${env.SHUTDOWN_GRACE_MS}")`)
  const cluster = redisCluster()
  const url = cluster === undefined ? await redisUrl() : ''
  const closers: Array<() => Promise<unknown>> = []

  if (ROLE !== 'worker') {
    const sessionSecret = env.SESSION_SECRET
    // WEBHOOK_URL and WEBHOOK_SECRET (whsec_...): final states of every kind are POSTed there.
    const webhooks = { ...(STALLED_INTERVAL_MS !== undefined ? { stalledIntervalMs: STALLED_INTERVAL_MS, lockDurationMs: 2 * STALLED_INTERVAL_MS } : {}), ...(env.WEBHOOK_BACKOFF_MS !== undefined ? { backoffMs: Number(env.WEBHOOK_BACKOFF_MS) } : {}) }
    const app = await buildApp({ redisUrl: url, redisCluster: cluster, sessionSecret, uploadDir: UPLOAD_DIR, apiKeys: env.API_KEYS, publicUrl: env.PUBLIC_URL, logger: { level: env.LOG_LEVEL ?? 'info' }, webhookUrl: env.WEBHOOK_URL, webhookSecret: env.WEBHOOK_SECRET, webhooks, ...(SHUTDOWN_GRACE_MS !== undefined ? { plugin: { uploads: { shutdownGraceMs: SHUTDOWN_GRACE_MS } } } : {}) })
    if (sessionSecret === undefined) app.log.warn('SESSION_SECRET is not set: using a random one. Sessions break across restarts and across instances; set it in production.')
    try {
      await app.listen({ port: PORT, host: HOST })
    } catch (err) {
      fail(`Cannot listen on ${HOST}:${PORT}: ${(err as Error).message}`)
    }
    closers.push(async () => await app.close())
  }
  if (ROLE !== 'api') {
    const storage = new DiskStorage(UPLOAD_DIR)
    for (const kind of Object.keys(KINDS)) {
      const worker = createJobWorker({ kind, connection: cluster === undefined ? url : cluster as unknown as Redis, ...(cluster !== undefined ? { prefix: CLUSTER_PREFIX } : {}), storage, workerOptions: { concurrency: Number(env.CONCURRENCY ?? 4), ...(STALLED_INTERVAL_MS !== undefined ? { stalledInterval: STALLED_INTERVAL_MS, lockDuration: 2 * STALLED_INTERVAL_MS } : {}) } }, demoProcessor(ITEM_DELAY_MS))
      worker.on('error', (err) => process.stderr.write(`worker ${kind}: ${err.message}\n`))
      closers.push(async () => await worker.close())
    }
    process.stdout.write(`Workers running for ${Object.keys(KINDS).join(', ')} (one record every ${ITEM_DELAY_MS} ms).\n`)
  }
  let closing = false
  const stop = (): void => {
    if (closing) return
    closing = true
    Promise.all(closers.map(async close => await close())).then(() => cluster?.disconnect()).then(() => process.exit(0), () => process.exit(1))
  }
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
}

main().catch((err: Error) => fail(`The example could not start: ${err.message}`))
