import type { ChildProcess } from 'node:child_process'
import { mkdir, readFile, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { freePort, RedisServer } from './redis'
import type { RedisCluster } from './redis-cluster'
import { tempDir } from './index'
import { spawnTracked } from './tracked'

interface Teardown { teardown: (fn: () => unknown) => void }

/** The repository root: the example and deploy/nginx.conf are run from here, as a user would. */
export const ROOT = resolve(__dirname, '..', '..')
export const NGINX_CONF = join(ROOT, 'deploy', 'nginx.conf')
export const SESSION_SECRET = 'a-cluster-secret-shared-by-every-instance'
/**
 * How the example's processes load its TypeScript: with the suite's own hook, as the test files
 * do (esbuild, types stripped), which costs a process about 40 % less CPU than tsx's loader;
 * the suite starts dozens of them.
 */
export const LOAD_TS = ['--require', join(ROOT, 'test', 'helpers', 'register.cjs')]

/** A child process of the cluster, with the tail of its output for error messages. */
export class Proc {
  readonly name: string
  readonly child: ChildProcess
  readonly exited: Promise<void>
  #output = ''
  #listeners: Array<() => void> = []

  constructor (name: string, command: string, args: string[], env: NodeJS.ProcessEnv) {
    this.name = name
    this.child = spawnTracked(command, args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] })
    this.exited = new Promise(resolve => {
      if (this.child.pid === undefined) {
        this.#output = `${command}: not found (npm test installs it: see scripts/ensure-tools.mjs)`
        resolve()
      } else {
        this.child.once('exit', () => resolve())
      }
    })
    const keep = (chunk: Buffer): void => {
      this.#output = (this.#output + chunk.toString()).slice(-4000)
      for (const listener of this.#listeners) listener()
    }
    this.child.stdout?.on('data', keep)
    this.child.stderr?.on('data', keep)
  }

  get output (): string {
    return this.#output
  }

  get running (): boolean {
    return this.child.pid !== undefined && this.child.exitCode === null && this.child.signalCode === null
  }

  /** Resolves once the process printed `text`; rejects if it exits first. */
  async printed (text: string, timeoutMs = 15_000): Promise<void> {
    if (this.#output.includes(text)) return
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`${this.name} did not print "${text}" within ${timeoutMs} ms:\n${this.#output}`)), timeoutMs)
      const check = (): void => { if (this.#output.includes(text)) done() }
      const done = (err?: Error): void => {
        clearTimeout(timer)
        this.#listeners = this.#listeners.filter(l => l !== check)
        if (err === undefined) resolve()
        else reject(err)
      }
      this.#listeners.push(check)
      void this.exited.then(() => done(new Error(`${this.name} exited before printing "${text}":\n${this.#output}`)))
    })
  }

  /** Sends `signal` and waits for the exit; SIGKILL follows if a graceful stop takes too long. */
  async stop (signal: NodeJS.Signals = 'SIGTERM', graceMs = 3_000): Promise<void> {
    if (!this.running) return
    this.child.kill(signal)
    const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs)
    await this.exited
    clearTimeout(timer)
  }
}

/** Polls `url` until it answers 200 (the process is ready) or the process exits. */
async function ready (proc: Proc, url: string, timeoutMs = 20_000): Promise<any> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (!proc.running) throw new Error(`${proc.name} exited before it was ready:\n${proc.output}`)
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1_000) })
      if (res.status === 200) return await res.json()
      await res.body?.cancel()
    } catch {}
    if (Date.now() > deadline) throw new Error(`${proc.name} not ready at ${url} within ${timeoutMs} ms:\n${proc.output}`)
    await sleep(50)
  }
}

export interface Api {
  proc: Proc
  port: number
  url: string
  ws: string
  /** The instance id the liveness route reports (the bridge consumer name). */
  id: string
}

export interface NginxProc {
  proc: Proc
  port: number
  url: string
  ws: string
}

export interface ClusterOptions {
  apis?: number
  workers?: number
  nginx?: boolean
  /** Extra environment for every API instance and worker. */
  env?: Record<string, string>
  /** Extra environment for workers only. */
  workerEnv?: Record<string, string>
  /**
   * Runs every process on this Redis Cluster (REDIS_CLUSTER_NODES) instead of a private
   * redis-server. The caller owns it, so one cluster can serve every test of a file.
   */
  redisCluster?: RedisCluster
}

/**
 * Real processes, as deployed: a private redis-server (or a Redis Cluster the caller passes), API
 * instances and workers of the example (`ROLE=api` / `ROLE=worker`, one shared SESSION_SECRET and
 * upload directory) and nginx running deploy/nginx.conf in front of the API instances. Everything
 * it started is stopped at teardown.
 */
export class Cluster {
  readonly #redis: RedisServer | null
  readonly redisCluster: RedisCluster | null
  readonly uploadDir: string
  readonly apis: Api[] = []
  readonly workers: Proc[] = []
  nginx: NginxProc | null = null
  readonly #env: Record<string, string>
  readonly #workerEnv: Record<string, string>
  readonly #t: Teardown
  #workerCount = 0
  #nginxPort: number | undefined

  private constructor (t: Teardown, redis: RedisServer | null, uploadDir: string, opts: ClusterOptions) {
    this.#t = t
    this.#redis = redis
    this.redisCluster = opts.redisCluster ?? null
    this.uploadDir = uploadDir
    this.#env = opts.env ?? {}
    this.#workerEnv = opts.workerEnv ?? {}
  }

  /** The private redis-server (not there when the processes run on a Redis Cluster). */
  get redis (): RedisServer {
    if (this.#redis === null) throw new Error('this cluster of processes runs on a Redis Cluster, not on a redis-server of its own')
    return this.#redis
  }

  static async start (t: Teardown, opts: ClusterOptions = {}): Promise<Cluster> {
    const redis = opts.redisCluster === undefined ? await RedisServer.start() : null
    const uploadDir = await tempDir(t, 'jp-cluster-uploads-')
    // nginx's port is chosen first: it is the public URL the API instances build `ws_url` from.
    const nginxPort = opts.nginx === true ? await freePort() : undefined
    const env = { ...(nginxPort !== undefined ? { PUBLIC_URL: `http://127.0.0.1:${nginxPort}` } : {}), ...opts.env }
    const cluster = new Cluster(t, redis, uploadDir, { ...opts, env })
    cluster.#nginxPort = nginxPort
    t.teardown(async () => await cluster.stop())
    // Start everything at once: each process takes about a second to load.
    await Promise.all([
      ...Array.from({ length: opts.apis ?? 2 }, async () => await cluster.startApi()),
      ...Array.from({ length: opts.workers ?? 1 }, async () => await cluster.startWorker())
    ])
    if (opts.nginx === true) await cluster.startNginx()
    return cluster
  }

  /** Stops everything it started, in order: the front first, then the apps and workers, Redis last. */
  async stop (): Promise<void> {
    await this.nginx?.proc.stop('SIGTERM')
    await Promise.all([...this.apis.map(a => a.proc), ...this.workers].map(async p => await p.stop('SIGKILL')))
    await this.#redis?.stop()
  }

  #baseEnv (): NodeJS.ProcessEnv {
    return {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      ...(this.redisCluster === null
        ? { REDIS_URL: this.redis.url }
        : { REDIS_CLUSTER_NODES: this.redisCluster.nodes.map(n => `${n.host}:${n.port}`).join(',') }),
      SESSION_SECRET,
      UPLOAD_DIR: this.uploadDir,
      ITEM_DELAY_MS: '30',
      LOG_LEVEL: 'warn',
      ...this.#env
    }
  }

  /**
   * Starts one API instance (`ROLE=api`) and waits until its readiness route answers 200 (its
   * Redis connections up, its bridge reading), as a load balancer's health check would. Liveness answers
   * as soon as the process listens; a socket sent before Redis is up waits for it, and past the
   * plugin's wait is closed with 1013 (try again later), which the tests' clients do not retry.
   */
  async startApi (port?: number): Promise<Api> {
    port ??= await freePort()
    const name = `api-${this.apis.length}`
    const proc = new Proc(name, process.execPath, [...LOAD_TS, 'example/server.ts'], { ...this.#baseEnv(), ROLE: 'api', HOST: '127.0.0.1', PORT: String(port) })
    const api: Api = { proc, port, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}`, id: '' }
    this.apis.push(api)
    api.id = (await ready(proc, `${api.url}/job-progress/ready`)).instance
    return api
  }

  /** Starts one worker process (`ROLE=worker`) and waits until its workers run. */
  async startWorker (env: Record<string, string> = {}): Promise<Proc> {
    const proc = new Proc(`worker-${this.#workerCount++}`, process.execPath, [...LOAD_TS, 'example/server.ts'], { ...this.#baseEnv(), ...this.#workerEnv, ...env, ROLE: 'worker' })
    this.workers.push(proc)
    await proc.printed('Workers running')
    return proc
  }

  /** Runs nginx with deploy/nginx.conf in front of the API instances started so far. */
  async startNginx (): Promise<NginxProc> {
    const prefix = await tempDir(this.#t, 'jp-nginx-')
    const port = this.#nginxPort ?? await freePort()
    const conf = renderNginxConf(await readFile(NGINX_CONF, 'utf8'), {
      servers: this.apis.map(a => `127.0.0.1:${a.port}`),
      port,
      prefix
    })
    await mkdir(join(prefix, 'temp'), { recursive: true })
    const file = join(prefix, 'nginx.conf')
    await writeFile(file, conf)
    // The conf leaves `user` and `pid` to the image's build; here they point at the temp prefix.
    const proc = new Proc('nginx', '/usr/sbin/nginx', ['-p', prefix, '-c', file, '-g', `daemon off; user root; pid ${join(prefix, 'nginx.pid')}; error_log stderr;`], { PATH: process.env.PATH })
    const nginx: NginxProc = { proc, port, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}` }
    this.nginx = nginx
    await ready(proc, `${nginx.url}/job-progress/health`)
    return nginx
  }
}

/** The processes of `sharedCluster`: call it for the set, `stop()` to end it before `t` ends. */
export interface SharedCluster {
  (): Promise<Cluster>
  stop: () => Promise<void>
}

/**
 * One set of processes (as `Cluster.start(t, opts)` makes) for the cases of a file that leave them
 * running: started at the first call, stopped when `t` ends or at `stop()`. Each API instance or
 * worker costs about a second of CPU to start, and a file of such cases started a set of three or
 * four per case. Sets on one Redis share its queues: a worker of one takes the jobs of another,
 * whose files are in another upload directory, so the shared set is stopped before another starts.
 */
export function sharedCluster (t: Teardown, opts: ClusterOptions = {}): SharedCluster {
  let cluster: Promise<Cluster> | undefined
  const get = async (): Promise<Cluster> => await (cluster ??= Cluster.start(t, opts))
  const stop = async (): Promise<void> => {
    const running = cluster
    cluster = undefined
    if (running !== undefined) await (await running).stop()
  }
  return Object.assign(get, { stop })
}

/**
 * The test's copy of deploy/nginx.conf (the mechanism is described at the top of that file):
 * local upstream servers between the markers, a local port for `listen 80;`, temp paths and no
 * access log under the temp prefix. Throws when the conf no longer has what is replaced, so the
 * test can never silently run a different configuration.
 */
export function renderNginxConf (conf: string, opts: { servers: string[], port: number, prefix: string }): string {
  const upstream = /^([ \t]*)# upstream servers: begin\n[\s\S]*?^[ \t]*# upstream servers: end\n/m
  const listen = /^([ \t]*)listen 80;$/m
  const http = /^http \{$/m
  for (const [name, re] of [['the upstream server markers', upstream], ['`listen 80;`', listen], ['`http {`', http]] as const) {
    if (!re.test(conf)) throw new Error(`deploy/nginx.conf: ${name} not found; the test renders the file by replacing it`)
  }
  const temp = ['client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi']
    .map(name => `    ${name}_temp_path ${join(opts.prefix, 'temp', name)};`).join('\n')
  return conf
    .replace(upstream, (_m, indent: string) => opts.servers.map(s => `${indent}server ${s};\n`).join(''))
    .replace(listen, (_m, indent: string) => `${indent}listen 127.0.0.1:${opts.port};`)
    .replace(http, `http {\n    access_log off;\n${temp}\n`)
}
