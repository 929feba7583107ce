import { spawn, type ChildProcess } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

/** Every process the bench started, so that any exit path can end them all. */
const children = new Set<ChildProcess>()

export const ROOT = join(__dirname, '..', '..')

/** The soft limit on open files of this process (children inherit it). */
export function openFileLimit (): number {
  try {
    const line = readFileSync('/proc/self/limits', 'utf8').split('\n').find(l => l.startsWith('Max open files'))
    const soft = line?.split(/\s{2,}/)[1]
    return soft === 'unlimited' ? Infinity : Number(soft)
  } catch {
    return Infinity
  }
}

export interface SpawnOptions {
  /** Extra node flags (--expose-gc, --cpu-prof ...). */
  node?: string[]
  env?: Record<string, string>
  /** Raise `ulimit -n` for this child (it holds thousands of sockets). */
  manyFiles?: boolean
  label: string
}

/** A forked bench process with request/response calls over IPC. */
export class Child {
  readonly proc: ChildProcess
  readonly label: string
  readonly ready: Promise<any>
  #next = 0
  readonly #pending = new Map<number, { resolve: (v: any) => void, reject: (e: Error) => void, cmd: string }>()
  #exited = false
  readonly exited: Promise<number | null>

  constructor (script: string, args: string[], opts: SpawnOptions) {
    this.label = opts.label
    const nodeArgs = [...(opts.node ?? []), '--import', 'tsx', join(ROOT, script), ...args]
    // A child that holds many sockets may need more descriptors than the default soft limit;
    // the shell raises it (up to the hard limit) and then becomes node, keeping the IPC channel.
    const wrap = opts.manyFiles === true && openFileLimit() < 16_384
    const proc = wrap
      ? spawn('sh', ['-c', 'ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"', 'sh', process.execPath, ...nodeArgs],
        { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced', env: { ...process.env, ...opts.env } })
      : spawn(process.execPath, nodeArgs,
        { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'advanced', env: { ...process.env, ...opts.env } })
    this.proc = proc
    children.add(proc)
    let onReady: (v: unknown) => void = () => {}
    let onFail: (e: Error) => void = () => {}
    this.ready = new Promise((resolve, reject) => { onReady = resolve; onFail = reject })
    this.ready.catch(() => {})
    proc.on('message', (m: any) => {
      if (m !== null && typeof m === 'object' && 'ready' in m) return onReady(m.ready)
      const waiter = this.#pending.get(m.id)
      if (waiter === undefined) return
      this.#pending.delete(m.id)
      if (m.ok === true) waiter.resolve(m.value)
      else waiter.reject(new Error(`${this.label}.${waiter.cmd}: ${String(m.error)}`))
    })
    this.exited = new Promise(resolve => proc.once('exit', (code) => {
      this.#exited = true
      children.delete(proc)
      const err = new Error(`${this.label} exited (code ${String(code)})`)
      onFail(err)
      for (const w of this.#pending.values()) w.reject(err)
      this.#pending.clear()
      resolve(code)
    }))
  }

  get pid (): number {
    return this.proc.pid as number
  }

  async call<T = any> (cmd: string, args?: unknown, timeoutMs = 120_000): Promise<T> {
    if (this.#exited) throw new Error(`${this.label} has exited`)
    const id = this.#next++
    return await new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id)
        reject(new Error(`${this.label}.${cmd} timed out after ${timeoutMs} ms`))
      }, timeoutMs)
      this.#pending.set(id, {
        cmd,
        resolve: (v) => { clearTimeout(timer); resolve(v) },
        reject: (e) => { clearTimeout(timer); reject(e) }
      })
      this.proc.send({ id, cmd, args })
    })
  }

  /** Asks the child to exit (servers close cleanly, which writes a --cpu-prof profile), then kills it. */
  async stop (graceMs = 5_000): Promise<void> {
    if (this.#exited) return
    await this.call('exit', undefined, graceMs).catch(() => {})
    const timer = setTimeout(() => this.proc.kill('SIGKILL'), graceMs)
    await this.exited
    clearTimeout(timer)
  }
}

/** Ends every child still running (last resort on failure; synchronous, so it works in 'exit'). */
export function killAll (): void {
  for (const proc of children) {
    try { proc.kill('SIGKILL') } catch {}
  }
  children.clear()
}

/** CPU seconds (user + system) of any process on this machine, from /proc. */
export function procCpuSeconds (pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after "(comm) ".
    return (Number(fields[11]) + Number(fields[12])) / 100
  } catch {
    return NaN
  }
}

/** Read/write system calls and context switches of a process so far, from /proc. */
export function procCounters (pid: number): { syscr: number, syscw: number, ctxSwitches: number } {
  try {
    const io = readFileSync(`/proc/${pid}/io`, 'utf8')
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const field = (text: string, name: string): number => Number(new RegExp(`^${name}:\\s*(\\d+)`, 'm').exec(text)?.[1] ?? NaN)
    return { syscr: field(io, 'syscr'), syscw: field(io, 'syscw'), ctxSwitches: field(status, 'voluntary_ctxt_switches') + field(status, 'nonvoluntary_ctxt_switches') }
  } catch {
    return { syscr: NaN, syscw: NaN, ctxSwitches: NaN }
  }
}

/** Pids of every bench process still running. */
export function benchPids (): number[] {
  return [...children].map(c => c.pid).filter((p): p is number => p !== undefined)
}

/** CPU seconds the whole machine has been busy (all cores, everything but idle and iowait). */
export function machineBusySeconds (): number {
  try {
    const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number)
    const [user, nice, system, , , irq, softirq, steal] = cpu
    return (user + nice + system + irq + softirq + (steal ?? 0)) / 100
  } catch {
    return NaN
  }
}
