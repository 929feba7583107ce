import t from 'tap'
import { randomUUID } from 'node:crypto'
import { readFileSync } from 'node:fs'
import type { Socket } from 'node:net'
import { resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'
import { jobsProtocol } from '../lib/index'
import { InboundLimit } from '../lib/session/inbound'
import { connect, eventually, redisFor, startApp, tempDir, uploadAs } from './helpers/index'
import { spawnTracked } from './helpers/tracked'

// Bounded inbound work (guarantee 6): what a socket's own messages may make the server do. A
// client that sends subscribes to random ids as fast as it can and reads none of the answers is
// closed with 1008 and a reason, and the instance does not grow; 100 subscriptions at once (a
// dashboard) are all answered.

const PATH = '/ws/jobs'

interface Teardown { teardown: (fn: () => unknown) => void }

t.test('the bucket and the count, row by row', async (t) => {
  const opts = { maxInFlight: 2, messagesPerSecond: 10, burst: 3 }
  const rows: Array<[string, (l: InboundLimit) => Array<string | null>, Array<string | null>]> = [
    ['a burst fits', l => [l.message(0), l.message(0), l.message(0)], [null, null, null]],
    ['one past the burst', l => [l.message(0), l.message(0), l.message(0), l.message(0)], [null, null, null, 'too many messages: at most 10 per second, 3 at once']],
    ['refilled at the rate', l => [l.message(0), l.message(0), l.message(0), l.message(100)], [null, null, null, null]],
    ['never above the burst', l => [l.message(0), l.message(10_000), l.message(10_000), l.message(10_000), l.message(10_000)], [null, null, null, null, 'too many messages: at most 10 per second, 3 at once']],
    ['in flight up to the bound', l => [l.begin(), l.begin(), l.begin()], [null, null, 'too many requests waiting for an answer: at most 2']],
    ['an answer frees its place', l => [l.begin(), l.begin(), (l.end(), l.begin())], [null, null, null]]
  ]
  for (const [name, run, expected] of rows) t.same(run(new InboundLimit(opts, 0)), expected, name)
})

interface FloodServer { port: number, pid: number, stop: () => Promise<void> }

async function floodServer (t: Teardown, redisUrl: string, inbound?: Record<string, number>): Promise<FloodServer> {
  const uploadDir = await tempDir(t, 'jp-flood-')
  const root = resolve(__dirname, '..')
  const child = spawnTracked(process.execPath, ['--expose-gc', '--require', resolve(root, 'test/helpers/register.cjs'), resolve(root, 'test/fixtures/flood-server.ts')], {
    cwd: root,
    env: { ...process.env, REDIS_URL: redisUrl, UPLOAD_DIR: uploadDir, ...(inbound === undefined ? {} : { INBOUND: JSON.stringify(inbound) }) },
    stdio: ['ignore', 'pipe', 'inherit']
  })
  const stop = async (): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) return
    const exited = new Promise(resolve => child.once('exit', resolve))
    child.kill('SIGTERM')
    await Promise.race([exited, sleep(5_000).then(() => child.kill('SIGKILL'))])
  }
  t.teardown(stop)
  const port = await new Promise<number>((resolve, reject) => {
    let out = ''
    child.stdout?.on('data', (chunk: Buffer) => {
      out += chunk.toString()
      const line = out.split('\n')[0]
      if (out.includes('\n')) resolve((JSON.parse(line) as { port: number }).port)
    })
    child.once('exit', (code) => reject(new Error(`flood-server exited with ${String(code)}`)))
    setTimeout(() => reject(new Error('flood-server did not start within 20 s')), 20_000).unref()
  })
  return { port, pid: child.pid as number, stop }
}

/** Client frames of subscribes to random job ids, `bytes` of them, masked with a zero key (so as they are). */
function subscribeFrames (bytes: number): Buffer {
  const frames: Buffer[] = []
  let total = 0
  while (total < bytes) {
    const payload = Buffer.from(JSON.stringify({ action: 'subscribe', job_id: randomUUID() }))
    // FIN + text, then MASK + the length (< 126), then the 4-byte key: zero, so the payload is unchanged.
    const frame = Buffer.concat([Buffer.from([0x81, 0x80 | payload.length, 0, 0, 0, 0]), payload])
    frames.push(frame)
    total += frame.length
  }
  return Buffer.concat(frames)
}

/** A process's resident set, in bytes, from /proc. */
function rss (pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8')
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)?.[1] ?? 0) * 1024
}

const MB = 1024 * 1024

t.test('a flood of subscribes read by nobody: closed 1008 with its reason, the instance does not grow', { timeout: 60_000 }, async (t) => {
  const redis = await redisFor(t)
  const server = await floodServer(t, redis.url)
  const url = `ws://127.0.0.1:${server.port}${PATH}?api_key=k`

  // Warm up: a client that behaves, so what the first socket and subscribe load is in the baseline.
  const polite = connect(t, url)
  await polite.waitFor(m => m.type === 'connected')
  for (let i = 0; i < 20; i++) polite.send({ action: 'subscribe', job_id: randomUUID() })
  await polite.waitFor(() => polite.messages.filter(m => m.type === 'error').length === 20)
  await sleep(500)
  const before = rss(server.pid)

  const socket = new WebSocket(url)
  t.teardown(() => socket.terminate())
  await new Promise((resolve, reject) => { socket.once('open', resolve); socket.once('error', reject) })
  let closed: { code: number, reason: string } | null = null
  const done = new Promise<void>(resolve => socket.once('close', (code, reason) => { closed = { code, reason: reason.toString() }; resolve() }))
  socket.on('message', () => {})
  socket.on('error', () => {})
  // Frames masked by hand (with a zero key) and written in 1 MB chunks straight to the TCP
  // socket: as fast as the connection takes them, without this process masking each one.
  const chunks = Array.from({ length: 8 }, () => subscribeFrames(MB))
  const tcp = (socket as unknown as { _socket: Socket })._socket
  // Reads none of the answers: they stay in the kernel's buffers and the server's.
  socket.pause()
  let sent = 0
  let peak = before
  const started = Date.now()
  for (let c = 0; Date.now() - started < 4_000; c++) {
    if (tcp.writableLength < 4 * MB) {
      const chunk = chunks[c % chunks.length]
      tcp.write(chunk)
      sent += chunk.length
    } else {
      await new Promise(resolve => setTimeout(resolve, 1))
    }
    peak = Math.max(peak, rss(server.pid))
    await new Promise(resolve => setImmediate(resolve))
  }
  const seconds = (Date.now() - started) / 1000
  // Now it reads: what the server sent, its close last.
  socket.resume()
  await Promise.race([done, sleep(10_000)])
  t.ok(closed !== null, `the socket was closed (flood of ${seconds.toFixed(1)} s, ${(sent / MB).toFixed(1)} MB sent)`)
  t.equal(closed?.code, 1008, 'closed with 1008: a client must not reconnect and do it again')
  t.comment(`closed ${String(closed?.code)} ${String(closed?.reason)}; RSS before ${(before / MB).toFixed(0)} MB`)
  t.match(closed?.reason, /^too many (messages: at most 50 per second, 256 at once|requests waiting for an answer: at most 256)$/, 'with a reason a person reads')

  await sleep(2_000)
  const after = rss(server.pid)
  t.ok(peak - before < 50 * MB, `RSS at most ${((peak - before) / MB).toFixed(1)} MB above the baseline during the flood`)
  t.ok(after - before < 50 * MB, `RSS ${((after - before) / MB).toFixed(1)} MB above the baseline after the close`)

  // The instance still serves the client that behaves.
  polite.send({ action: 'ping' })
  await polite.waitFor(m => m.type === 'pong')
})

t.test('100 subscriptions at once, as a dashboard sends them: every one answered, nothing closed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })] })
  const ids: string[] = []
  for (let i = 0; i < 100; i++) ids.push(await uploadAs(app, 'k', i % 2 === 0 ? 'batch' : 'dataset'))
  const client = connect(t, `${app.ws}${PATH}?api_key=k`)
  await client.waitFor(m => m.type === 'connected')
  // Sent in one turn: the server reads them at once.
  for (const id of ids) client.socket.send(JSON.stringify({ action: 'subscribe', job_id: id }))
  t.ok(await eventually(() => new Set(client.messages.filter(m => m.type === 'job_update').map(m => m.job_id)).size === 100, 15_000), 'a job_update for each of the 100 jobs')
  t.same(client.messages.filter(m => m.type === 'error'), [], 'no error')
  t.equal(client.socket.readyState, WebSocket.OPEN, 'still open')
})

t.test('more subscribes waiting for Redis than maxInFlight: closed 1008 naming the bound', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })], inbound: { maxInFlight: 10, messagesPerSecond: 1_000_000, burst: 1_000_000 } })
  const client = connect(t, `${app.ws}${PATH}?api_key=k`)
  await client.waitFor(m => m.type === 'connected')
  // Redis paused: nothing is answered, so each subscribe stays in flight.
  redis.signal('SIGSTOP')
  t.teardown(() => redis.signal('SIGCONT'))
  for (let i = 0; i < 11; i++) client.send({ action: 'subscribe', job_id: randomUUID() })
  t.same(await client.closed, { code: 1008, reason: 'too many requests waiting for an answer: at most 10' })
  redis.signal('SIGCONT')
})
