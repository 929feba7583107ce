// `npm run test:compose`: docker-compose.yml run for real (not part of `npm test`).
//
//   Redis, 2 API instances, a worker and nginx, built from this checkout; an upload through nginx
//   watched to its end over WebSocket and by polling; the API scaled to 3; one API container
//   stopped with SIGTERM mid-job (its sockets close with 1001, the client reconnects through nginx
//   and reaches the final state); Redis restarted mid-job (append-only file: the job and its
//   watchers converge); `down -v` leaves no container, network or volume behind.
//
// `npm run test:compose -- --cluster` runs the same stack on docker-compose.cluster.yml on top
// (a Redis Cluster of 3 masters and 3 replicas instead of one Redis): the same steps, and instead
// of the Redis restart, the master that owns the queue's slot is stopped mid-job (its replica
// takes over) and started again.
//
// Where no image registry is reachable, scripts/standin-images.sh first builds local stand-ins
// for the base images. Needs docker (the daemon is started when it is not running and this runs
// as root), and docker compose v2 or docker-compose 1.29.
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { createServer } from 'node:net'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'

const ROOT = resolve(__dirname, '..')
const PROJECT = `jpcompose${process.pid}`
const CLUSTER = process.argv.includes('--cluster')
const FILES = CLUSTER ? ['-f', 'docker-compose.yml', '-f', 'docker-compose.cluster.yml'] : []
const timings: Array<[string, number]> = []
let failures = 0

function log (line: string): void {
  process.stdout.write(`[test:compose] ${line}\n`)
}

function check (ok: boolean, what: string): void {
  if (!ok) failures++
  log(`${ok ? 'ok' : 'NOT OK'} - ${what}`)
}

async function step<T> (name: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now()
  log(`${name} ...`)
  try {
    return await fn()
  } finally {
    const s = (Date.now() - t0) / 1000
    timings.push([name, s])
    log(`${name}: ${s.toFixed(1)} s`)
  }
}

function run (cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv, quiet?: boolean } = {}): string {
  const res = spawnSync(cmd, args, { cwd: ROOT, env: opts.env ?? process.env, encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 })
  if (res.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${res.status}):\n${(res.stderr ?? '').slice(-3000)}${(res.stdout ?? '').slice(-2000)}`)
  return res.stdout
}

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

async function ensureDocker (): Promise<void> {
  if (spawnSync('docker', ['info'], { stdio: 'ignore' }).status === 0) return
  if (process.getuid?.() !== 0 || spawnSync('sh', ['-c', 'command -v dockerd'], { stdio: 'ignore' }).status !== 0) {
    throw new Error('the Docker daemon is not running: start it (sudo systemctl start docker, or sudo dockerd &) and try again')
  }
  const logFile = '/var/tmp/jp-dockerd.log'
  // setsid: the daemon outlives this script, as a system service would.
  const child = spawn('sh', ['-c', `exec setsid dockerd >${logFile} 2>&1 </dev/null`], { detached: true, stdio: 'ignore' })
  child.unref()
  log(`the Docker daemon was not running: started it (log ${logFile}); it keeps running after this script`)
  for (let i = 0; i < 120; i++) {
    if (spawnSync('docker', ['info'], { stdio: 'ignore' }).status === 0) return
    await sleep(500)
  }
  throw new Error(`dockerd did not come up; see ${logFile}`)
}

/** `docker compose` (v2) when present, else `docker-compose` (1.29). */
function composeCommand (): string[] {
  if (spawnSync('docker', ['compose', 'version'], { stdio: 'ignore' }).status === 0) return ['docker', 'compose']
  if (spawnSync('docker-compose', ['version'], { stdio: 'ignore' }).status === 0) return ['docker-compose']
  throw new Error('neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)')
}

const env: NodeJS.ProcessEnv = { ...process.env, SESSION_SECRET: randomBytes(24).toString('hex'), ITEM_DELAY_MS: '100', LOG_LEVEL: 'warn', COMPOSE_PROJECT_NAME: PROJECT }
let compose: string[] = []
const dc = (...args: string[]): string => run(compose[0], [...compose.slice(1), ...FILES, '-p', PROJECT, ...args], { env })

function containers (service: string): string[] {
  return dc('ps', '-q', service).split('\n').map(s => s.trim()).filter(Boolean)
}

function health (id: string): string {
  return execFileSync('docker', ['inspect', '-f', '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}', id], { encoding: 'utf8' }).trim()
}

function ipOf (id: string): string {
  return execFileSync('docker', ['inspect', '-f', '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}', id], { encoding: 'utf8' }).trim().split(' ')[0]
}

async function until (what: string, check: () => boolean | Promise<boolean>, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    try { if (await check()) return } catch {}
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(250)
  }
}

let base = ''
let wsBase = ''

/** The service (redis-1 ... redis-6) of the master that owns the slot of the queue `batch`. */
function queueMaster (): string {
  const any = containers('redis-1')[0]
  const slot = run('docker', ['exec', any, 'redis-cli', 'cluster', 'keyslot', '{bull}:batch:events']).trim()
  const nodes = run('docker', ['exec', any, 'redis-cli', 'cluster', 'nodes']).split('\n')
  for (const line of nodes) {
    const f = line.split(' ')
    if (!f[2]?.includes('master') || f[2].includes('fail')) continue
    for (const range of f.slice(8)) {
      const [from, to] = range.split('-').map(Number)
      if (Number(slot) >= from && Number(slot) <= (to ?? from)) return /(redis-\d)/.exec(f[1])?.[1] ?? ''
    }
  }
  throw new Error(`no master owns slot ${slot}`)
}

async function uploadJob (records: number): Promise<{ jobId: string, statusUrl: string, wsUrl: string, cookie: string }> {
  const form = new FormData()
  form.append('file', new Blob([Array.from({ length: records }, (_, i) => `record-${i + 1}`).join('\n') + '\n'], { type: 'text/plain' }), 'records.txt')
  const res = await fetch(`${base}/batch/upload`, { method: 'POST', body: form })
  const body = await res.json() as { job_id: string, status_url: string, ws_url: string }
  if (res.status !== 202) throw new Error(`upload answered ${res.status}: ${JSON.stringify(body)}`)
  const cookie = (res.headers.get('set-cookie') ?? '').split(';')[0]
  return { jobId: body.job_id, statusUrl: body.status_url, wsUrl: body.ws_url, cookie }
}

interface Watch { messages: any[], closed: Promise<{ code: number, reason: string }>, socket: WebSocket }

function watch (url: string, cookie: string): Watch {
  const socket = new WebSocket(url, { headers: { cookie } })
  const messages: any[] = []
  socket.on('message', (data) => { try { messages.push(JSON.parse(data.toString())) } catch {} })
  socket.on('error', () => {})
  const closed = new Promise<{ code: number, reason: string }>(resolve => socket.once('close', (code, reason) => resolve({ code, reason: reason.toString() })))
  return { messages, closed, socket }
}

const final = (w: Watch): any => w.messages.find(m => m?.status === 'complete' || m?.status === 'failed' || m?.status === 'cancelled')

async function pollToEnd (statusUrl: string, cookie: string, timeoutMs = 120_000): Promise<any> {
  let last: any = null
  await until('the status route to report a final state', async () => {
    const res = await fetch(base + statusUrl, { headers: { cookie } })
    if (res.status !== 200) return false
    last = await res.json()
    return last.status !== 'processing' && last.status !== 'queued' && last.status !== 'waiting'
  }, timeoutMs)
  return last
}

async function main (): Promise<void> {
  const t0 = Date.now()
  await step('docker daemon', ensureDocker)
  compose = composeCommand()
  log(`using ${compose.join(' ')}; project ${PROJECT}`)
  await step('base images (local stand-ins where no registry is reachable)', async () => {
    const res = spawnSync('bash', [join(ROOT, 'scripts', 'standin-images.sh')], { stdio: 'inherit' })
    if (res.status !== 0) throw new Error('could not build the stand-in base images')
  })
  const port = await freePort()
  env.HTTP_PORT = String(port)
  base = `http://127.0.0.1:${port}`
  wsBase = `ws://127.0.0.1:${port}`

  await step('build the app image', async () => { dc('build', '-q') })
  await step(`up: ${CLUSTER ? 'a Redis Cluster (3 masters, 3 replicas)' : 'redis'}, 2 api, 1 worker, nginx; all ready`, async () => {
    // --scale: docker-compose 1.29 ignores deploy.replicas.
    dc('up', '-d', '--scale', 'api=2', '--scale', 'worker=1')
    await until('2 ready API instances', () => containers('api').length === 2 && containers('api').every(id => health(id) === 'healthy'))
    await until('nginx to answer /job-progress/ready', async () => (await fetch(`${base}/job-progress/ready`)).status === 200)
  })

  await step('upload through nginx, watch to the end over WebSocket and by polling', async () => {
    const job = await uploadJob(30)
    const w = watch(wsBase + job.wsUrl, job.cookie)
    const polled = await pollToEnd(job.statusUrl, job.cookie)
    await until('the final message on the socket', () => final(w) !== undefined, 30_000)
    check(final(w)?.status === 'complete', `the socket's last state is complete (${final(w)?.status}, ${w.messages.length} messages)`)
    check(polled.status === 'complete', `polling reaches complete (${polled.status})`)
    check(w.messages.some(m => m?.status === 'processing'), 'progress was streamed before the end')
    w.socket.terminate()
  })

  await step('scale the API to 3', async () => {
    dc('up', '-d', '--no-recreate', '--scale', 'api=3', '--scale', 'worker=1')
    await until('3 ready API instances', () => containers('api').length === 3 && containers('api').every(id => health(id) === 'healthy'))
    const seen = new Set<string>()
    await until('nginx to reach all 3 instances', async () => {
      for (let i = 0; i < 6; i++) seen.add(((await (await fetch(`${base}/job-progress/health`)).json()) as { instance: string }).instance)
      return seen.size === 3
    }, 30_000)
    check(seen.size === 3, `nginx spreads requests over ${seen.size} instances`)
  })

  await step('SIGTERM one API container mid-job: 1001, reconnect through nginx, final state', async () => {
    const job = await uploadJob(150)
    const victim = containers('api')[0]
    const direct = watch(`ws://${ipOf(victim)}:8001${job.wsUrl}`, job.cookie)
    await until('progress on the socket of the instance to be stopped', () => direct.messages.some(m => m?.status === 'processing'), 30_000)
    execFileSync('docker', ['kill', '--signal', 'SIGTERM', victim])
    const closed = await direct.closed
    check(closed.code === 1001, `the stopped instance's socket closes with 1001 (${closed.code} "${closed.reason}")`)
    const again = watch(wsBase + job.wsUrl, job.cookie)
    await until('the reconnected socket to get the final state', () => final(again) !== undefined, 60_000)
    check(final(again)?.status === 'complete', `the reconnected client reaches complete (${final(again)?.status})`)
    again.socket.terminate()
    // Back to 3 running instances for what follows (the stopped one is started again).
    dc('up', '-d', '--no-recreate', '--scale', 'api=3', '--scale', 'worker=1')
  })

  if (!CLUSTER) {
    await step('restart Redis mid-job: the job and its watchers converge', async () => {
      const job = await uploadJob(100)
      const w = watch(wsBase + job.wsUrl, job.cookie)
      await until('progress before the restart', () => w.messages.some(m => m?.status === 'processing' && m.processed > 5), 30_000)
      dc('restart', 'redis')
      const polled = await pollToEnd(job.statusUrl, job.cookie)
      await until('the watcher to see the final state', () => final(w) !== undefined, 60_000)
      check(polled.status === 'complete', `the job completes after the restart (${polled.status})`)
      check(final(w)?.status === 'complete', `the watcher's last state is complete (${final(w)?.status})`)
      w.socket.terminate()
    })
  } else {
    await step('stop the master of the queue\'s slot mid-job: its replica takes over, the job and its watchers converge', async () => {
      const job = await uploadJob(100)
      const w = watch(wsBase + job.wsUrl, job.cookie)
      await until('progress before the stop', () => w.messages.some(m => m?.status === 'processing' && m.processed > 5), 30_000)
      const master = queueMaster()
      log(`the queue's slot is on ${master}`)
      dc('stop', '-t', '0', master)
      const polled = await pollToEnd(job.statusUrl, job.cookie)
      await until('the watcher to see the final state', () => final(w) !== undefined, 60_000)
      check(polled.status === 'complete', `the job completes after the failover (${polled.status})`)
      check(final(w)?.status === 'complete', `the watcher's last state is complete (${final(w)?.status})`)
      w.socket.terminate()
      dc('start', master)
    })
  }

  await step('down -v leaves nothing', async () => { await down() })
  const filter = `label=com.docker.compose.project=${PROJECT}`
  const left = [
    ...run('docker', ['ps', '-aq', '--filter', filter]).split('\n'),
    ...run('docker', ['network', 'ls', '-q', '--filter', filter]).split('\n'),
    ...run('docker', ['volume', 'ls', '-q', '--filter', filter]).split('\n')
  ].filter(Boolean)
  check(left.length === 0, `no container, network or volume of the project is left (${left.length})`)
  log(`timings: ${timings.map(([n, s]) => `${n}: ${s.toFixed(1)} s`).join('; ')}; total ${((Date.now() - t0) / 1000).toFixed(1)} s`)
}

let downDone = false
async function down (): Promise<void> {
  if (downDone || compose.length === 0) return
  downDone = true
  dc('down', '-v', '--remove-orphans', '-t', '20')
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    log(`${signal}: taking the stack down`)
    try { void down() } catch {}
    process.exit(130)
  })
}

main().then(() => {
  if (failures > 0) {
    log(`FAILED: ${failures} check(s) did not pass`)
    process.exitCode = 1
  } else {
    log('passed')
  }
}, async (err: Error) => {
  log(`FAILED: ${err.message}`)
  try {
    if (compose.length > 0) process.stdout.write(dc('logs', '--tail', '30').slice(-6000))
  } catch {}
  try { await down() } catch (e) { log(`down failed: ${(e as Error).message}`) }
  process.exitCode = 1
})
