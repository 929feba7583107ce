import t from 'tap'
import type { Test } from 'tap'
import Fastify from 'fastify'
import { connect as tcp, type Socket } from 'node:net'
import { setTimeout as sleep } from 'node:timers/promises'
import { createJobWorker, jobProgress } from '../lib/index'
import { LOAD_TS, Proc, SESSION_SECRET } from './helpers/cluster'
import { connect, eventually, filesIn, freePort, lines, RedisServer, tempDir, timed, upload } from './helpers/index'

// Shutdown ends within stated bounds whatever clients and Redis do (guarantee 7). Each case
// prints the seconds it measured; the assertions allow 6 s over the bound for a loaded machine.
const SLACK_MS = 6_000
const GRACE_MS = 1_000
const BOUNDARY = 'shutdown-boundary'
// app.close() without connections left open, Redis away: what Redis is asked at close (2 s), the
// webhooks' worker (2 s, then 1 s for BullMQ to finish) and the QUITs of the plugin's own
// connections (2 s, side by side).
const CLOSE_BOUND_MS = 7_000

const seconds = (ms: number): string => (ms / 1000).toFixed(2)

/** A private redis-server, stopped (and resumed first, if paused) at teardown. */
async function redisFor (t: Test): Promise<RedisServer> {
  const redis = await RedisServer.start()
  t.teardown(async () => {
    redis.signal('SIGCONT')
    await redis.stop()
  })
  return redis
}

/** The example's API (ROLE=api) as a child process with a 1 s shutdown grace; killed at teardown. */
async function startExample (t: Test, redis: RedisServer): Promise<{ proc: Proc, url: string, port: number, uploadDir: string }> {
  const port = await freePort()
  const uploadDir = await tempDir(t, 'jp-shutdown-uploads-')
  const proc = new Proc('api', process.execPath, [...LOAD_TS, 'example/server.ts'], {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    REDIS_URL: redis.url,
    SESSION_SECRET,
    UPLOAD_DIR: uploadDir,
    LOG_LEVEL: 'warn',
    ROLE: 'api',
    HOST: '127.0.0.1',
    PORT: String(port),
    SHUTDOWN_GRACE_MS: String(GRACE_MS)
  })
  t.teardown(async () => await proc.stop('SIGKILL'))
  const url = `http://127.0.0.1:${port}`
  const ready = await eventually(async () => {
    if (!proc.running) return true
    const res = await fetch(`${url}/job-progress/ready`, { signal: AbortSignal.timeout(1_000) }).catch(() => null)
    await res?.body?.cancel()
    return res?.status === 200
  }, 30_000, 100)
  if (!ready || !proc.running) throw new Error(`the example did not start:\n${proc.output}`)
  return { proc, url, port, uploadDir }
}

/**
 * An upload that sends one byte every 200 ms and never ends (a raw TCP client, so nothing on
 * the client's side closes it); what the server answers is collected.
 */
function trickle (t: Test, port: number): { socket: Socket, received: () => string, closed: Promise<void> } {
  const socket = tcp(port, '127.0.0.1')
  let received = ''
  socket.on('data', (chunk: Buffer) => { received += chunk.toString() })
  socket.on('error', () => {})
  const closed = new Promise<void>(resolve => socket.once('close', () => resolve()))
  socket.write(`POST /batch/upload HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nContent-Type: multipart/form-data; boundary=${BOUNDARY}\r\nContent-Length: 10000000\r\n\r\n`)
  socket.write(`--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.txt"\r\nContent-Type: text/plain\r\n\r\n`)
  socket.write('item\n'.repeat(200))
  const timer = setInterval(() => { if (!socket.destroyed) socket.write('x') }, 200)
  t.teardown(() => {
    clearInterval(timer)
    socket.destroy()
  })
  return { socket, received: () => received, closed }
}

t.test('SIGTERM while a client trickles an upload: answered 503, its connection closed, the process exits within the grace + 2 s', async (t) => {
  const redis = await redisFor(t)
  const { proc, port, uploadDir } = await startExample(t, redis)
  const client = trickle(t, port)
  t.ok(await eventually(async () => (await filesIn(uploadDir)).some(f => f.endsWith('.part')), 10_000), 'the server is writing the upload')
  await sleep(400)

  proc.child.kill('SIGTERM')
  const bound = GRACE_MS + 2_000
  const took = await timed(proc.exited, bound + SLACK_MS)
  t.comment(`exit after SIGTERM with a trickling upload: ${took === null ? `still running after ${seconds(bound + SLACK_MS)}` : seconds(took)} s (bound ${seconds(bound)} s)`)
  t.ok(took !== null && took < bound + SLACK_MS, 'the process exited')
  t.match(client.received(), /^HTTP\/1\.1 503 /, 'the client was answered 503')
  t.ok(await timed(client.closed, 1_000) !== null, 'and its connection closed')
})

t.test('SIGTERM with a socket that does not answer the close: the process exits within the grace + 2 s', async (t) => {
  const redis = await redisFor(t)
  const { proc, url } = await startExample(t, redis)
  const up = await upload(`${url}/batch/upload`, lines(3))
  t.equal(up.status, 202)
  const client = connect(t, `ws://127.0.0.1:${new URL(url).port}${String(up.body.ws_url)}`, { cookie: up.cookie })
  await client.waitFor(m => m !== undefined)
  // Reads nothing more: the server's close frame is never answered.
  ;(client.socket as unknown as { _socket: { pause: () => void } })._socket.pause()

  proc.child.kill('SIGTERM')
  const bound = GRACE_MS + 2_000
  const took = await timed(proc.exited, bound + SLACK_MS)
  t.comment(`exit after SIGTERM with a socket that does not answer: ${took === null ? `still running after ${seconds(bound + SLACK_MS)}` : seconds(took)} s (bound ${seconds(bound)} s)`)
  t.ok(took !== null && took < bound + SLACK_MS, 'the process exited')
})

t.test('a worker closed during a Redis outage resolves within closeTimeoutMs + 2 s', async (t) => {
  for (const outage of ['killed', 'paused'] as const) {
    const redis = await redisFor(t)
    const closeTimeoutMs = 1_000
    const worker = createJobWorker({ kind: 'batch', connection: redis.url, closeTimeoutMs }, async () => ({}))
    worker.on('error', () => {})
    let closed = false
    worker.once('closed', () => { closed = true })
    t.teardown(async () => { await worker.close(true).catch(() => {}) })
    await worker.waitUntilReady()
    // The worker is blocked on its next job.
    await sleep(500)
    if (outage === 'killed') await redis.kill()
    else redis.signal('SIGSTOP')
    await sleep(500)

    const bound = closeTimeoutMs + 2_000
    const took = await timed(worker.close(), bound + SLACK_MS)
    t.comment(`worker.close() with Redis ${outage}: ${took === null ? `still pending after ${seconds(bound + SLACK_MS)}` : seconds(took)} s (bound ${seconds(bound)} s)`)
    t.ok(took !== null && took < bound + SLACK_MS, `close() resolved with Redis ${outage}`)
    t.ok(closed, 'BullMQ\'s own close finished (its connections ended)')
  }
})

t.test('closeTimeoutMs is checked before any connection is opened', async (t) => {
  for (const bad of [-1, 1.5, Number.POSITIVE_INFINITY, 2 ** 31]) {
    t.throws(() => createJobWorker({ kind: 'batch', connection: 'redis://127.0.0.1:1', closeTimeoutMs: bad }, async () => ({})), { code: 'FST_JP_INVALID_OPTION', message: /closeTimeoutMs must be a whole number of milliseconds/ }, String(bad))
  }
})

t.test('app.close() with webhooks configured resolves within a bound during a Redis outage', async (t) => {
  for (const outage of ['killed', 'paused'] as const) {
    const redis = await redisFor(t)
    const uploadDir = await tempDir(t)
    const app = Fastify({ logger: false })
    await app.register(jobProgress, {
      connection: redis.url,
      kinds: { batch: { webhook: { url: 'https://hooks.example.com/jobs' } } },
      webhooks: { secret: 'whsec_' + Buffer.from('a-webhook-secret-of-enough-length').toString('base64') },
      session: { secret: 'a-test-secret-of-enough-length' },
      uploadDir,
      uploads: { shutdownGraceMs: GRACE_MS }
    })
    await app.listen({ port: 0, host: '127.0.0.1' })
    let closing: Promise<unknown> | null = null
    t.teardown(async () => { await (closing ?? app.close()).catch(() => {}) })
    // Its delivery worker and the bridge are blocked on Redis.
    await sleep(1_000)
    if (outage === 'killed') await redis.kill()
    else redis.signal('SIGSTOP')
    await sleep(500)

    closing = app.close()
    const took = await timed(closing, CLOSE_BOUND_MS + SLACK_MS)
    t.comment(`app.close() with webhooks, Redis ${outage}: ${took === null ? `still pending after ${seconds(CLOSE_BOUND_MS + SLACK_MS)}` : seconds(took)} s (bound ${seconds(CLOSE_BOUND_MS)} s)`)
    t.ok(took !== null && took < CLOSE_BOUND_MS + SLACK_MS, `app.close() resolved with Redis ${outage}`)
  }
})
