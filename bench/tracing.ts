/**
 * What OpenTelemetry tracing costs the server per message, in one run: tracing off, on without an
 * SDK (the default of an app that has none), and with an SDK registered sampling 1 % and 100 %.
 *
 *   npx tsx bench/tracing.ts [--jobs=50] [--sockets=10] [--rate=10] [--items=60]
 *
 * For each mode: a private redis-server, one API server (test/fixtures/otel-api.ts) and one worker
 * (test/fixtures/otel-worker.ts), both with test/fixtures/otel-sdk.ts loaded by `--import` when an
 * SDK is asked for (OTLP/HTTP export to a sink in this process); `jobs` uploads, `sockets` sockets
 * watching each, the worker reporting `rate` times a second for `items` reports per job. Server
 * CPU seconds over the window, per 10,000 messages the sockets received, and the ratio to off.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import WebSocket from 'ws'
import { freePort } from '../test/helpers/redis'
import { procCpuSeconds, ROOT } from './lib/proc'
import { BenchRedis } from './lib/redis'

const arg = (name: string, dflt: number): number => Number(process.argv.find(a => a.startsWith(`--${name}=`))?.split('=')[1] ?? dflt)
const JOBS = arg('jobs', 50)
const SOCKETS = arg('sockets', 10)
const RATE = arg('rate', 10)
const ITEMS = arg('items', 60)
const AUTH = { authorization: 'Bearer key-alice' }

interface Mode { name: string, tracing: boolean, ratio: number | null }
const MODES: Mode[] = [
  { name: 'off (tracing: false)', tracing: false, ratio: null },
  { name: 'on, no SDK', tracing: true, ratio: null },
  { name: 'SDK, 1 % sampled', tracing: true, ratio: 0.01 },
  { name: 'SDK, 100 % sampled', tracing: true, ratio: 1 }
]

const procs = new Set<ChildProcess>()

async function start (fixture: string, sdk: boolean, env: Record<string, string>, readyText: string): Promise<ChildProcess> {
  const args = ['--import', 'tsx', ...(sdk ? ['--import', './test/fixtures/otel-sdk.ts'] : []), fixture]
  const child = spawn(process.execPath, args, { cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] })
  procs.add(child)
  await new Promise<void>((resolve, reject) => {
    let out = ''
    child.stdout?.on('data', (chunk: Buffer) => {
      out += chunk.toString()
      if (out.includes(readyText)) resolve()
    })
    child.once('exit', (code) => reject(new Error(`${fixture} exited (${String(code)}) before it was ready`)))
  })
  return child
}

async function stop (child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  const exited = new Promise(resolve => child.once('exit', resolve))
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), 5_000)
  await exited
  clearTimeout(timer)
  procs.delete(child)
}

async function uploadJob (url: string, items: number): Promise<string> {
  const form = new FormData()
  form.append('file', new Blob([Array.from({ length: items }, (_, i) => `item-${i}`).join('\n') + '\n']), 'items.txt')
  const res = await fetch(`${url}/batch/upload`, { method: 'POST', body: form, headers: AUTH })
  if (res.status !== 202) throw new Error(`upload answered ${res.status}`)
  return ((await res.json()) as { job_id: string }).job_id
}

interface Watcher { received: () => number, done: () => boolean, close: () => void }

async function watch (ws: string, jobId: string): Promise<Watcher> {
  let count = 0
  let final = false
  const socket = new WebSocket(`${ws}/ws/batch/${jobId}`, { headers: AUTH })
  socket.on('message', (data) => {
    count++
    if (!String(data).includes('"processing"')) final = true
  })
  socket.on('error', () => {})
  await new Promise<void>((resolve, reject) => {
    socket.once('open', () => resolve())
    socket.once('close', () => reject(new Error('closed before it opened')))
  })
  return { received: () => count, done: () => final, close: () => socket.terminate() }
}

async function run (mode: Mode, sink: string): Promise<{ messages: number, cpu: number, spans: number }> {
  const redis = await BenchRedis.start()
  const uploadDir = mkdtempSync(join(tmpdir(), 'jp-bench-tracing-'))
  const port = await freePort()
  const env = {
    REDIS_URL: `redis://127.0.0.1:${redis.port}`,
    UPLOAD_DIR: uploadDir,
    TRACING: mode.tracing ? '1' : '0',
    OTEL_SAMPLE_RATIO: String(mode.ratio ?? 0),
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: sink
  }
  const sdk = mode.ratio !== null
  const children: ChildProcess[] = []
  try {
    const api = await start('test/fixtures/otel-api.ts', sdk, { ...env, PORT: String(port), OTEL_PROCESS: 'api' }, `listening ${port}`)
    children.push(api)
    // The worker waits for the sockets: jobs are uploaded while it is not yet running.
    const jobs: string[] = []
    for (let i = 0; i < JOBS; i++) jobs.push(await uploadJob(`http://127.0.0.1:${port}`, ITEMS))
    const watchers = (await Promise.all(jobs.map(async id => await Promise.all(Array.from({ length: SOCKETS }, async () => await watch(`ws://127.0.0.1:${port}`, id)))))).flat()
    await new Promise(resolve => setTimeout(resolve, 500))
    const base = watchers.reduce((n, w) => n + w.received(), 0)
    const cpu0 = procCpuSeconds(api.pid as number)
    children.push(await start('test/fixtures/otel-worker.ts', sdk, { ...env, OTEL_PROCESS: 'worker', ITEM_DELAY_MS: String(Math.round(1000 / RATE)), CONCURRENCY: String(JOBS) }, 'worker ready'))
    const deadline = Date.now() + (ITEMS / RATE) * 1000 + 60_000
    while (Date.now() < deadline && !watchers.every(w => w.done())) await new Promise(resolve => setTimeout(resolve, 50))
    const cpu = procCpuSeconds(api.pid as number) - cpu0
    const messages = watchers.reduce((n, w) => n + w.received(), 0) - base
    for (const w of watchers) w.close()
    return { messages, cpu, spans: 0 }
  } finally {
    for (const child of children.reverse()) await stop(child)
    await redis.stop()
    rmSync(uploadDir, { recursive: true, force: true })
  }
}

async function main (): Promise<void> {
  let spans = 0
  const sink = createServer((req, res) => {
    req.on('data', () => {})
    req.on('end', () => { spans++; res.writeHead(200, { 'content-type': 'application/json' }).end('{}') })
  })
  await new Promise<void>(resolve => sink.listen(0, '127.0.0.1', resolve))
  const url = `http://127.0.0.1:${(sink.address() as AddressInfo).port}/v1/traces`
  const rows: Array<Record<string, string | number>> = []
  let off = 0
  try {
    for (const mode of MODES) {
      const before = spans
      const r = await run(mode, url)
      const perTenK = r.cpu / r.messages * 10_000 * 1000
      if (rows.length === 0) off = perTenK
      rows.push({
        mode: mode.name,
        'messages delivered': r.messages,
        'server CPU ms per 10k messages': Math.round(perTenK),
        'ratio to off': Math.round(perTenK / off * 100) / 100,
        'OTLP exports received': spans - before
      })
      console.error(`${mode.name}: done`)
    }
  } finally {
    sink.close()
    for (const child of procs) child.kill('SIGKILL')
  }
  const keys = Object.keys(rows[0])
  console.log(`${JOBS} jobs × ${SOCKETS} sockets × ${RATE}/s, ${ITEMS} reports per job\n`)
  console.log(`| ${keys.join(' | ')} |\n| ${keys.map(() => '---').join(' | ')} |`)
  for (const r of rows) console.log(`| ${keys.map(k => r[k]).join(' | ')} |`)
  writeFileSync(join(__dirname, 'results', 'tracing.json'), JSON.stringify({ date: new Date().toISOString(), jobs: JOBS, sockets: SOCKETS, rate: RATE, items: ITEMS, rows }, null, 2) + '\n')
}

main().catch((err) => {
  console.error(err)
  for (const child of procs) child.kill('SIGKILL')
  process.exit(1)
})
