/**
 * Measures the API server's memory while it takes one large upload, to show that uploads are
 * streamed to storage and never buffered whole.
 *
 *   npx tsx scripts/upload-rss.ts            # 200 MB
 *   UPLOAD_MB=500 npx tsx scripts/upload-rss.ts
 *
 * The example app runs in a child process (so the client's own memory is not counted) against a
 * private redis-server; the child samples its RSS every 50 ms. The client generates the body on
 * the fly, chunk by chunk, honouring back-pressure: nothing of that size is held or written on
 * the client side. Prints baseline, peak and growth in MB; exits 1 when growth reaches the target.
 */
import { fork, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises'
import { request } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const MB = 1024 * 1024
const SAMPLE_MS = 50
const TARGET_GROWTH_MB = 50

interface Report { baseline: number, peak: number, samples: number }
type FromChild = { type: 'listening', port: number } | { type: 'baseline', rss: number } | { type: 'report', report: Report }

// ---------------------------------------------------------------- server (child process)

async function server (): Promise<void> {
  const { buildApp } = await import('../example/app')
  const size = Number(process.env.JP_RSS_BYTES)
  const app = await buildApp({
    redisUrl: process.env.JP_RSS_REDIS as string,
    uploadDir: process.env.JP_RSS_DIR as string,
    sessionSecret: 'upload-rss-session-secret-0123456789',
    // The default file limit (100 MB) would refuse the measured upload.
    plugin: { limits: { fileSize: size + MB } }
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const send = (message: FromChild): void => { process.send?.(message) }

  let baseline = 0
  let peak = 0
  let samples = 0
  const sample = (): void => {
    const rss = process.memoryUsage().rss
    samples++
    if (rss > peak) peak = rss
  }
  const timer = setInterval(sample, SAMPLE_MS)

  process.on('message', (message: { type: string }) => {
    if (message.type === 'baseline') {
      // Settle the heap first, so the baseline is what the idle server needs.
      globalThis.gc?.()
      baseline = process.memoryUsage().rss
      peak = baseline
      samples = 0
      send({ type: 'baseline', rss: baseline })
    } else if (message.type === 'report') {
      sample()
      send({ type: 'report', report: { baseline, peak, samples } })
    } else if (message.type === 'stop') {
      clearInterval(timer)
      app.close().then(() => process.exit(0), () => process.exit(1))
    }
  })
  send({ type: 'listening', port: (app.server.address() as { port: number }).port })
}

// ---------------------------------------------------------------- client (this process)

function next (child: ChildProcess, type: FromChild['type']): Promise<FromChild> {
  return new Promise((resolve, reject) => {
    const onMessage = (message: FromChild): void => {
      if (message.type !== type) return
      child.off('message', onMessage)
      child.off('exit', onExit)
      resolve(message)
    }
    const onExit = (code: number | null): void => reject(new Error(`the server exited (code ${String(code)}) before sending "${type}"`))
    child.on('message', onMessage)
    child.once('exit', onExit)
  })
}

/** Streams a multipart upload of `bytes` bytes of `item-<n>` lines, generated chunk by chunk. */
async function streamUpload (port: number, bytes: number): Promise<{ status: number, body: string }> {
  const boundary = `----upload-rss-${Date.now()}`
  const head = Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n`)
  const tail = Buffer.from(`\r\n--${boundary}--\r\n`)
  const req = request({
    host: '127.0.0.1',
    port,
    method: 'POST',
    path: '/batch/upload',
    headers: { 'content-type': `multipart/form-data; boundary=${boundary}`, 'content-length': head.length + bytes + tail.length }
  })
  const response = new Promise<{ status: number, body: string }>((resolve, reject) => {
    req.once('error', reject)
    req.once('response', (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { body += chunk })
      res.once('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
  })
  req.write(head)
  const line = 16 // 'item-' + 10 digits + '\n'
  const chunkLines = 4096
  let item = 0
  let left = bytes
  while (left > 0) {
    // A fresh chunk each time, so the data is really generated, not one buffer resent.
    const chunk = Buffer.allocUnsafe(Math.min(left, line * chunkLines))
    for (let off = 0; off + line <= chunk.length; off += line) {
      chunk.write(`item-${String(item++).padStart(10, '0')}\n`, off, 'latin1')
    }
    const rest = chunk.length % line
    if (rest > 0) chunk.fill(0x0a, chunk.length - rest)
    left -= chunk.length
    if (!req.write(chunk)) await once(req, 'drain')
  }
  req.end(tail)
  return await response
}

async function main (): Promise<void> {
  const { RedisServer } = await import('../test/helpers/redis')
  const megabytes = Number(process.env.UPLOAD_MB ?? 200)
  if (!Number.isFinite(megabytes) || megabytes <= 0) throw new Error(`UPLOAD_MB must be a positive number (got "${process.env.UPLOAD_MB}")`)
  const bytes = Math.round(megabytes * MB)
  const redis = await RedisServer.start()
  const dir = await mkdtemp(join(tmpdir(), 'jp-upload-rss-'))
  let child: ChildProcess | null = null
  try {
    child = fork(__filename, [], {
      execArgv: [...process.execArgv, '--expose-gc'],
      env: { ...process.env, JP_RSS_CHILD: '1', JP_RSS_REDIS: redis.url, JP_RSS_DIR: dir, JP_RSS_BYTES: String(bytes) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc']
    })
    const { port } = await next(child, 'listening') as { port: number }

    // Warm up the upload path (lazy requires, JIT) so the baseline is a server that has served.
    const warm = await streamUpload(port, 64 * 1024)
    if (warm.status !== 202) throw new Error(`warm-up upload answered ${warm.status}: ${warm.body}`)
    await new Promise(resolve => setTimeout(resolve, 300))
    child.send({ type: 'baseline' })
    await next(child, 'baseline')

    const started = Date.now()
    const res = await streamUpload(port, bytes)
    const seconds = (Date.now() - started) / 1000
    if (res.status !== 202) throw new Error(`upload answered ${res.status}: ${res.body}`)
    const jobId = (JSON.parse(res.body) as { job_id: string }).job_id
    child.send({ type: 'report' })
    const { report } = await next(child, 'report') as { report: Report }

    const stored = (await readdir(dir)).find(f => f.includes(jobId))
    const storedBytes = stored === undefined ? -1 : (await stat(join(dir, stored))).size
    const growth = (report.peak - report.baseline) / MB
    const mb = (n: number): string => (n / MB).toFixed(1)
    process.stdout.write([
      `upload:   ${megabytes} MB streamed in ${seconds.toFixed(1)} s (${(megabytes / seconds).toFixed(0)} MB/s), answered ${res.status}`,
      `stored:   ${storedBytes === bytes ? 'complete' : 'WRONG SIZE'} (${storedBytes} of ${bytes} bytes)`,
      `server RSS, sampled every ${SAMPLE_MS} ms (${report.samples} samples during the upload):`,
      `  baseline ${mb(report.baseline)} MB`,
      `  peak     ${mb(report.peak)} MB`,
      `  growth   ${growth.toFixed(1)} MB (target < ${TARGET_GROWTH_MB} MB: ${growth < TARGET_GROWTH_MB ? 'met' : 'MISSED'})`,
      ''
    ].join('\n'))
    if (growth >= TARGET_GROWTH_MB || storedBytes !== bytes) process.exitCode = 1
  } finally {
    if (child !== null && child.exitCode === null) {
      const exited = once(child, 'exit')
      child.send({ type: 'stop' })
      const timer = setTimeout(() => child?.kill('SIGKILL'), 5_000)
      await exited
      clearTimeout(timer)
    }
    await redis.stop()
    await rm(dir, { recursive: true, force: true })
  }
}

const run = process.env.JP_RSS_CHILD === '1' ? server : main
run().catch((err: Error) => {
  process.stderr.write(`upload-rss: ${err.message}\n`)
  process.exit(1)
})
