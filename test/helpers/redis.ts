import type { ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { Redis } from 'ioredis'
import { mkdtempTracked, removeTracked, spawnTracked } from './tracked'

/** The lowest port the kernel hands out to outgoing connections (Linux's default: 32768). */
function ephemeralLow (): number {
  try {
    const low = Number(readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0])
    return Number.isInteger(low) && low > 0 ? low : 32768
  } catch {
    return 32768
  }
}

// Ports are drawn below the range the kernel picks outgoing connections' ports from: a port the
// kernel chose for `listen(0)` came from that range, and between the probe and the server's own
// `listen` a connection of any test process running alongside (a Redis client, a fetch) could take
// it (EADDRINUSE). Below the range, only another test's draw could, and every draw is random. The
// top leaves room for a Redis Cluster node's bus port (the node's port + 10000) under the range too.
const LOW = 10_000
const HIGH = ephemeralLow() - 10_000
const FETCH_BAD_PORT = 10_080

async function bindable (port: number): Promise<number | null> {
  return await new Promise(resolve => {
    const server = createServer()
    server.unref()
    server.once('error', () => resolve(null))
    server.listen(port, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

/** A free TCP port on 127.0.0.1. */
export async function freePort (): Promise<number> {
  for (let tries = HIGH - LOW >= 1_000 ? 0 : 50; tries < 50; tries++) {
    const draw = LOW + Math.floor(Math.random() * (HIGH - LOW))
    // fetch refuses to connect to the ports of its "bad ports" list: 10080 is the one in this range.
    if (draw === FETCH_BAD_PORT) continue
    const port = await bindable(draw)
    if (port !== null) return port
  }
  // A machine whose outgoing range starts low: the kernel's choice.
  const port = await bindable(0)
  if (port === null) throw new Error('no free port on 127.0.0.1')
  return port
}

/** redis-server exited as soon as it started: on a free port, another process took it first. */
class PortTakenError extends Error {}

/**
 * Whether a redis-server on `port` answers a PING within `ms`; gives up early once `gone()` says
 * the process has ended.
 */
export async function answers (port: number, gone: () => boolean = () => false, ms = 10_000): Promise<boolean> {
  const deadline = Date.now() + ms
  for (;;) {
    const probe = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, disconnectTimeout: 0 })
    probe.on('error', () => {})
    try {
      await probe.connect()
      await probe.ping()
      return true
    } catch {
      if (Date.now() > deadline || gone()) return false
      await new Promise(resolve => setTimeout(resolve, 50))
    } finally {
      probe.disconnect()
    }
  }
}

/**
 * A private redis-server on a free port, with append-only persistence so a restart keeps the
 * jobs (fault tests restart it). Never touches the machine's own Redis.
 *
 * `appendfsync no`: Redis writes each command to the file before it replies, so a redis-server
 * killed outright (SIGKILL) still leaves every acknowledged write behind in the file; only a crash
 * of the machine would lose them, which no test makes. An fsync per write (`always`) made every
 * Redis command of the suite wait on the disk, a millisecond or more while other files run.
 */
export class RedisServer {
  readonly port: number
  readonly dir: string
  #proc: ChildProcess | null = null

  private constructor (port: number, dir: string) {
    this.port = port
    this.dir = dir
  }

  static async start (): Promise<RedisServer> {
    // A free port can be taken by another test process between the probe and redis-server's
    // bind (tap runs files in parallel): then redis-server exits at once, and a new port is tried.
    for (let attempt = 1; ; attempt++) {
      const server = new RedisServer(await freePort(), mkdtempTracked('jp-redis-'))
      try {
        await server.up()
        return server
      } catch (err) {
        await server.stop()
        if (attempt >= 3 || !(err instanceof PortTakenError)) throw err
      }
    }
  }

  get url (): string {
    return `redis://127.0.0.1:${this.port}`
  }

  async up (): Promise<void> {
    if (this.#proc !== null && this.#proc.exitCode === null) return
    const proc = spawnTracked('redis-server', [
      '--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir,
      '--save', '', '--appendonly', 'yes', '--appendfsync', 'no', '--daemonize', 'no', '--loglevel', 'warning'
    ], { stdio: 'ignore' })
    this.#proc = proc
    if (await answers(this.port, () => proc.exitCode !== null || proc.pid === undefined)) return
    if (proc.pid === undefined) throw new Error('redis-server is not installed (npm test installs it: see scripts/ensure-tools.mjs)')
    const exited = proc.exitCode !== null
    await this.down()
    if (exited) throw new PortTakenError(`redis-server exited at start on port ${this.port} (port taken?)`)
    throw new Error(`redis-server did not start on port ${this.port}`)
  }

  /** Stops the server (SIGTERM: it flushes its append-only file first). */
  async down (): Promise<void> {
    const proc = this.#proc
    this.#proc = null
    if (proc === null || proc.exitCode !== null || proc.signalCode !== null || proc.pid === undefined) return
    await new Promise<void>(resolve => {
      proc.once('exit', () => resolve())
      proc.kill('SIGTERM')
    })
  }

  /** Sends a signal to the server (SIGSTOP/SIGCONT pause and resume it). */
  signal (signal: NodeJS.Signals): void {
    this.#proc?.kill(signal)
  }

  /** Kills the server without letting it shut down (what it acknowledged is in its append-only file already). */
  async kill (): Promise<void> {
    const proc = this.#proc
    this.#proc = null
    if (proc === null || proc.exitCode !== null) return
    await new Promise<void>(resolve => {
      proc.once('exit', () => resolve())
      proc.kill('SIGKILL')
    })
  }

  async restart (): Promise<void> {
    await this.down()
    await this.up()
  }

  async stop (): Promise<void> {
    await this.down()
    removeTracked(this.dir)
  }

  /** A new client (the caller closes it). */
  client (): Redis {
    const redis = new Redis(this.port, '127.0.0.1', { maxRetriesPerRequest: null })
    redis.on('error', () => {})
    return redis
  }
}
