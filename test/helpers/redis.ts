import type { ChildProcess } from 'node:child_process'
import { createServer } from 'node:net'
import { Redis } from 'ioredis'
import { mkdtempTracked, removeTracked, spawnTracked } from './tracked'

/** A free TCP port on 127.0.0.1. */
export async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.unref()
    server.on('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

/**
 * A private redis-server on a free port, with append-only persistence so a restart keeps the
 * jobs (fault tests restart it). Never touches the machine's own Redis.
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
    const server = new RedisServer(await freePort(), mkdtempTracked('jp-redis-'))
    try {
      await server.up()
    } catch (err) {
      await server.stop()
      throw err
    }
    return server
  }

  get url (): string {
    return `redis://127.0.0.1:${this.port}`
  }

  async up (): Promise<void> {
    if (this.#proc !== null && this.#proc.exitCode === null) return
    const proc = spawnTracked('redis-server', [
      '--port', String(this.port), '--bind', '127.0.0.1', '--dir', this.dir,
      '--save', '', '--appendonly', 'yes', '--appendfsync', 'always', '--daemonize', 'no', '--loglevel', 'warning'
    ], { stdio: 'ignore' })
    this.#proc = proc
    const deadline = Date.now() + 10_000
    for (;;) {
      const probe = new Redis(this.port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, disconnectTimeout: 0 })
      probe.on('error', () => {})
      try {
        await probe.connect()
        await probe.ping()
        probe.disconnect()
        return
      } catch {
        probe.disconnect()
        if (Date.now() > deadline || proc.exitCode !== null || proc.pid === undefined) {
          if (proc.pid === undefined) throw new Error('redis-server is not installed (npm test installs it: see scripts/ensure-tools.mjs)')
          await this.down()
          throw new Error(`redis-server did not start on port ${this.port}`)
        }
        await new Promise(resolve => setTimeout(resolve, 50))
      }
    }
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

  /** Kills the server without letting it flush (its append-only file is fsynced per write). */
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
