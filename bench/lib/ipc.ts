import { Session } from 'node:inspector'
import { writeFileSync } from 'node:fs'
import { writeHeapSnapshot } from 'node:v8'

/**
 * Request/response over the IPC channel of a forked child. The bench's processes (servers,
 * clients, driver) expose named handlers; the runner calls them and awaits the reply. Children
 * exit when the channel closes, so a runner that dies takes no process with it.
 */
export type Handlers = Record<string, (args: any) => unknown>

interface Request { id: number, cmd: string, args: unknown }
interface Reply { id: number, ok: boolean, value?: unknown, error?: string }

/** Child side: answers the runner's calls; sends `{ ready: value }` once set up. */
export function serve (handlers: Handlers, ready: unknown = true): void {
  if (process.send === undefined) throw new Error('this script runs as a child of bench/run.ts')
  const send = (m: unknown): void => { process.send?.(m) }
  process.on('message', (m: Request) => {
    const handler = handlers[m.cmd]
    if (handler === undefined) {
      send({ id: m.id, ok: false, error: `unknown command ${m.cmd}` } satisfies Reply)
      return
    }
    Promise.resolve()
      .then(async () => await handler(m.args))
      .then(value => send({ id: m.id, ok: true, value } satisfies Reply),
        (err: Error) => send({ id: m.id, ok: false, error: err?.stack ?? String(err) } satisfies Reply))
  })
  // The runner is gone (or closed the channel): nothing will ever ask us anything again.
  process.on('disconnect', () => process.exit(0))
  send({ ready })
}

/** CPU seconds (user + system) this process has used so far. */
export function cpuSeconds (): number {
  const u = process.cpuUsage()
  return (u.user + u.system) / 1e6
}

/** Wall-clock milliseconds with sub-millisecond resolution, comparable across processes. */
export function nowMs (): number {
  return performance.timeOrigin + performance.now()
}

/** RSS after a full GC (the process runs with --expose-gc). */
export async function settledMemory (): Promise<{ rss: number, heapUsed: number }> {
  const gc = (globalThis as { gc?: () => void }).gc
  for (let i = 0; i < 3; i++) {
    gc?.()
    await new Promise(resolve => setTimeout(resolve, 50))
  }
  const m = process.memoryUsage()
  return { rss: m.rss, heapUsed: m.heapUsed }
}

/** Samples RSS until stopped; reports the peak (upload growth). */
export class RssSampler {
  #timer: NodeJS.Timeout | null = null
  peak = 0
  start (everyMs = 10): void {
    this.peak = process.memoryUsage.rss()
    this.#timer = setInterval(() => { this.peak = Math.max(this.peak, process.memoryUsage.rss()) }, everyMs)
  }

  stop (): number {
    if (this.#timer !== null) clearInterval(this.#timer)
    this.#timer = null
    this.peak = Math.max(this.peak, process.memoryUsage.rss())
    return this.peak
  }
}

/** Handlers every bench server answers: CPU, settled memory, peak-RSS sampling, exit. */
export function commonHandlers (close: () => Promise<void>): Handlers {
  const sampler = new RssSampler()
  let inspector: Session | null = null
  const post = async (method: string, params?: object): Promise<any> => await new Promise((resolve, reject) => {
    inspector?.post(method, params, (err, result) => err === null ? resolve(result) : reject(err))
  })
  return {
    // The same V8 CPU profiler as --cpu-prof, but over exactly the measured window.
    profileStart: async () => {
      inspector = new Session()
      inspector.connect()
      await post('Profiler.enable')
      await post('Profiler.setSamplingInterval', { interval: 200 })
      await post('Profiler.start')
      // Allocation sampling too: what each system allocates per message drives its GC pauses.
      await post('HeapProfiler.enable')
      // BENCH_HEAP_SURVIVORS: only what outlived a scavenge (promoted, whether a major GC freed it
      // since, or still held after a last minor GC at the step's end). Scavenges copy what
      // survives them: that, not what was allocated, is what makes them long.
      await post('HeapProfiler.startSampling', { samplingInterval: 4096, includeObjectsCollectedByMajorGC: true, includeObjectsCollectedByMinorGC: process.env.BENCH_HEAP_SURVIVORS === undefined })
    },
    profileStop: async (file: string) => {
      const { profile } = await post('Profiler.stop')
      if (process.env.BENCH_HEAP_SURVIVORS !== undefined) (globalThis as { gc?: (o: object) => void }).gc?.({ type: 'minor' })
      const heap = await post('HeapProfiler.stopSampling')
      writeFileSync(file.replace(/\.cpuprofile$/, '.heapprofile'), JSON.stringify(heap.profile))
      inspector?.disconnect()
      inspector = null
      writeFileSync(file, JSON.stringify(profile))
    },
    cpu: () => cpuSeconds(),
    memory: async () => await settledMemory(),
    heapSnapshot: (file: string) => writeHeapSnapshot(file),
    timeOrigin: () => performance.timeOrigin,
    sampleStart: () => { sampler.start() },
    sampleStop: () => sampler.stop(),
    exit: async () => {
      await close().catch(() => {})
      // Reply first, then exit on the next turn (a --cpu-prof profile is written at exit).
      setTimeout(() => process.exit(0), 20)
    }
  }
}
