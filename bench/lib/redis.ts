import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { Redis } from 'ioredis'
import { freePort } from '../../test/helpers/redis'

/**
 * The bench's own redis-server on a free port. Unlike the test helper's server it keeps nothing
 * on disk: an fsync per write would measure the disk, not the systems under test.
 */
export class BenchRedis {
  readonly port: number
  readonly proc: ChildProcess
  readonly info: Redis

  private constructor (port: number, proc: ChildProcess, info: Redis) {
    this.port = port
    this.proc = proc
    this.info = info
  }

  static async start (): Promise<BenchRedis> {
    const port = await freePort()
    const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--daemonize', 'no', '--loglevel', 'warning', '--maxclients', '10000'], { stdio: 'ignore' })
    const deadline = Date.now() + 10_000
    for (;;) {
      const probe = new Redis(port, '127.0.0.1', { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null })
      probe.on('error', () => {})
      try {
        await probe.connect()
        await probe.ping()
        return new BenchRedis(port, proc, probe)
      } catch {
        probe.disconnect()
        if (Date.now() > deadline || proc.exitCode !== null) {
          proc.kill('SIGKILL')
          throw new Error(`redis-server did not start on port ${port}`)
        }
        await new Promise(resolve => setTimeout(resolve, 50))
      }
    }
  }

  get url (): string {
    return `redis://127.0.0.1:${this.port}`
  }

  static version (): string {
    const out = spawnSync('redis-server', ['--version'], { encoding: 'utf8' }).stdout ?? ''
    return /v=(\S+)/.exec(out)?.[1] ?? 'unknown'
  }

  /** Commands per name, bytes in/out and CPU so far; the INFO call itself is left out of the counts. */
  async snapshot (): Promise<RedisCounters> {
    return await readCounters(this.info)
  }

  async flush (): Promise<void> {
    await this.info.flushall()
  }

  async stop (): Promise<void> {
    this.info.disconnect()
    if (this.proc.exitCode !== null) return
    await new Promise<void>(resolve => {
      const timer = setTimeout(() => this.proc.kill('SIGKILL'), 3_000)
      this.proc.once('exit', () => { clearTimeout(timer); resolve() })
      this.proc.kill('SIGTERM')
    })
  }

  /** Synchronous last-resort kill for exit handlers. */
  kill (): void {
    try { this.proc.kill('SIGKILL') } catch {}
  }
}

export interface RedisCounters {
  commands: Record<string, number>
  netOut: number
  netIn: number
  cpu: number
  replyBytes: number
}

export interface RedisDelta {
  commands: number
  byCommand: Record<string, number>
  netOut: number
  netIn: number
  cpu: number
}

export function redisDelta (a: RedisCounters, b: RedisCounters): RedisDelta {
  const byCommand: Record<string, number> = {}
  let commands = 0
  for (const [name, calls] of Object.entries(b.commands)) {
    const d = calls - (a.commands[name] ?? 0)
    if (d > 0) {
      byCommand[name] = d
      commands += d
    }
  }
  return { commands, byCommand, netOut: b.netOut - a.netOut - a.replyBytes, netIn: b.netIn - a.netIn, cpu: b.cpu - a.cpu }
}

/** One node's commands per name (INFO left out), bytes in/out and CPU so far, from INFO. */
export async function readCounters (node: Pick<Redis, 'info'>): Promise<RedisCounters> {
  const text = await node.info('stats', 'commandstats', 'cpu') as string
  const commands: Record<string, number> = {}
  let netOut = 0
  let netIn = 0
  let cpu = 0
  for (const line of text.split('\r\n')) {
    const cmd = /^cmdstat_([^:]+):calls=(\d+)/.exec(line)
    if (cmd !== null) {
      if (cmd[1] !== 'info') commands[cmd[1]] = Number(cmd[2])
      continue
    }
    const [key, value] = line.split(':')
    if (key === 'total_net_output_bytes') netOut = Number(value)
    else if (key === 'total_net_input_bytes') netIn = Number(value)
    else if (key === 'used_cpu_user' || key === 'used_cpu_sys') cpu += Number(value)
  }
  // This reply is counted in the next reading's output bytes: remember its size to take it out.
  return { commands, netOut, netIn, cpu, replyBytes: Buffer.byteLength(text) + 16 }
}
