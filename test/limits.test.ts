import t from 'tap'
import { once } from 'node:events'
import type { AddressInfo } from 'node:net'
import pino from 'pino'
import WebSocket, { WebSocketServer } from 'ws'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { createJobWorker, DiskStorage, jobsProtocol } from '../lib/index'
import { socketErrorHandler, WebSocketTransport } from '../lib/transports/websocket'
import { CLOSE_ADVICE, closeReason, CloseCodes, shouldRetry } from '../lib/wire/close-codes'
import { connect, eventually, lines, redisFor, startApp, upload, type Client } from './helpers/index'

// Everything a client makes the server queue counts against one per-connection byte limit, and
// every close the server sends says why.

const PATH = '/ws/jobs'

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

/** Inbound bounds no flood here reaches, for the tests of what a client leaves unread. */
const UNBOUNDED_INBOUND = { maxInFlight: 1_000_000, messagesPerSecond: 1_000_000, burst: 1_000_000 }

function pause (client: Client): void {
  (client.socket as unknown as { _socket: { pause: () => void } })._socket.pause()
}
function resume (client: Client): void {
  (client.socket as unknown as { _socket: { resume: () => void } })._socket.resume()
}

t.test('close codes: a reason for each, retry advice, reasons cut to 123 bytes', async (t) => {
  for (const code of Object.values(CloseCodes)) {
    t.ok(CLOSE_ADVICE[code]?.reason, `${code} has a reason`)
    t.equal(shouldRetry(code), CLOSE_ADVICE[code].retry, `${code}: shouldRetry agrees with the table`)
  }
  t.equal(shouldRetry(CloseCodes.unauthorized), false)
  t.equal(shouldRetry(CloseCodes.forbidden), false)
  t.equal(shouldRetry(CloseCodes.goingAway), true)
  t.equal(shouldRetry(CloseCodes.slowClient), true)
  t.equal(shouldRetry(4999), true, 'an unknown code is retried')
  t.equal(closeReason(1009), 'message too big')
  t.equal(closeReason(1009, ''), 'message too big')
  t.equal(closeReason(4999), 'closed')
  t.equal(Buffer.byteLength(closeReason(1008, 'é'.repeat(100))), 122, 'cut on a character, within 123 bytes')
})

t.test('a frame over maxPayload closes 1009 with a reason, though ws itself refused it', async (t) => {
  const redis = await redisFor(t)
  const { ws } = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })] })
  const client = connect(t, `${ws}${PATH}?api_key=k`)
  await client.waitFor(m => m.type === 'connected')
  client.send('x'.repeat(5000))
  const closed = await client.closed
  t.equal(closed.code, 1009)
  t.equal(closed.reason, 'message too big')
})

t.test('repeated finals a client never reads: closed 4008 at the byte limit, with its reason; memory back after close', async (t) => {
  const redis = await redisFor(t)
  const maxBufferedBytes = 256 * 1024
  // The inbound bounds (inbound-limits.test.ts) would close it first: this is about the bytes it leaves unread.
  const { url, ws, app, uploadDir } = await startApp(t, redis, { maxBufferedBytes, protocols: [jobsProtocol({ path: PATH })], inbound: UNBOUNDED_INBOUND })
  const up = await upload(`${url}/batch/upload`, lines(1))
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async () => ({ text: 'r'.repeat(8 * 1024) }))
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  await new Promise(resolve => worker.once('completed', resolve))

  const reader = connect(t, `${ws}${PATH}`, { cookie: up.cookie })
  await reader.waitFor(m => m.type === 'connected')
  const client = connect(t, `${ws}${PATH}`, { cookie: up.cookie })
  await client.waitFor(m => m.type === 'connected')
  client.send({ action: 'subscribe', job_id: up.body.job_id })
  await client.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')

  gc()
  const before = process.memoryUsage().heapUsed
  pause(client)
  // 3,000 answers of 8 KB: far more than the kernel buffers for a reader that has stopped.
  const subscribe = JSON.stringify({ action: 'subscribe', job_id: up.body.job_id })
  for (let i = 0; i < 3000; i++) client.socket.send(subscribe)
  t.ok(await eventually(() => app.jobProgress.stats().sockets === 1, 15_000), 'the flooding connection was closed')
  resume(client)
  const closed = await client.closed
  t.equal(closed.code, 4008)
  t.match(closed.reason, /not reading its messages \(over 262144 bytes unread\)/)
  const answers = client.messages.filter(m => m.type === 'job_update').length
  t.ok(answers < 1000, `it got ${answers} of the 3000 answers, not all`)

  // The other connection is untouched.
  reader.send({ action: 'ping' })
  await reader.waitFor(m => m.type === 'pong')
  // This process holds the test's client too: what it received is not the server's memory.
  client.messages.length = 0
  gc()
  const after = process.memoryUsage().heapUsed
  t.ok(after - before < 4 * 1024 * 1024, `heap after close within 4 MB of before (${((after - before) / 1024 / 1024).toFixed(1)} MB); the flood was ~24 MB`)
})

t.test('pings a client never reads count too', async (t) => {
  const redis = await redisFor(t)
  const { ws, app } = await startApp(t, redis, { apiKeys: { k: 'alice' }, maxBufferedBytes: 64 * 1024, protocols: [jobsProtocol({ path: PATH })], inbound: UNBOUNDED_INBOUND })
  const client = connect(t, `${ws}${PATH}?api_key=k`)
  await client.waitFor(m => m.type === 'connected')
  pause(client)
  // Each pong is ~30 bytes: send until the limit is reached, in rounds so the server reads them.
  const ping = JSON.stringify({ action: 'ping' })
  let sent = 0
  while (app.jobProgress.stats().sockets > 0 && sent < 2_000_000) {
    for (let i = 0; i < 5000; i++) client.socket.send(ping)
    sent += 5000
    await new Promise(resolve => client.socket.send(ping, resolve))
    await new Promise(resolve => setTimeout(resolve, 10))
  }
  t.equal(app.jobProgress.stats().sockets, 0, `closed after ${sent} pings`)
  resume(client)
  // 4008 when the client reads through its backlog before the server cuts it (1006) a few seconds later.
  t.ok([4008, 1006].includes((await client.closed).code))
})

t.test('a socket error: the application\'s own error listener still gets it, and the plugin\'s log line names the request', async (t) => {
  const redis = await redisFor(t)
  const { app, ws } = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })] })
  // The plugin registered @fastify/websocket and put one shared listener in place of its
  // per-socket one; a listener the application added on `connection` is not that one.
  const seen: Error[] = []
  app.websocketServer.on('connection', (socket: WebSocket) => { socket.on('error', (err) => seen.push(err)) })
  const client = connect(t, `${ws}${PATH}?api_key=k`)
  await client.waitFor(m => m.type === 'connected')
  client.send('x'.repeat(5000))
  t.equal((await client.closed).code, 1009)
  t.equal(seen.length, 1, 'the application\'s listener got the error')
  t.match(seen[0].message, /payload/i)

  // The shared listener logs what @fastify/websocket's default handler logged, with the request id.
  const logged: Array<Record<string, unknown>> = []
  const log = pino({ level: 'error' }, { write: (line: string) => { logged.push(JSON.parse(line)) } })
  const server = new WebSocketServer({ port: 0 })
  t.teardown(() => server.close())
  await once(server, 'listening')
  const peer = new WebSocket(`ws://127.0.0.1:${(server.address() as AddressInfo).port}`)
  t.teardown(() => peer.terminate())
  const [socket] = await once(server, 'connection') as [WebSocket]
  // eslint-disable-next-line no-new
  new WebSocketTransport(socket, 'req-7')
  socket.on('error', socketErrorHandler(log))
  socket.emit('error', new Error('boom'))
  await once(peer, 'close')
  t.match(logged, [{ level: 50, reqId: 'req-7', msg: 'boom', err: { message: 'boom' } }])
})

t.test('keepalive: a peer that answers no ping is terminated; one that answers stays open', async (t) => {
  const redis = await redisFor(t)
  const { ws } = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })], pingIntervalMs: 100 })
  const open = async (autoPong: boolean): Promise<WebSocket> => {
    const socket = new WebSocket(`${ws}${PATH}?api_key=k`, { autoPong })
    t.teardown(() => socket.terminate())
    await once(socket, 'message')
    return socket
  }
  const answering = await open(true)
  const vanished = await open(false)
  let pings = 0
  const threePings = new Promise<void>(resolve => answering.on('ping', () => { if (++pings === 3) resolve() }))
  // Unanswered, a ping ends the connection at the next sweep, with no close frame.
  const [code] = await once(vanished, 'close') as [number]
  t.equal(code, 1006, 'terminated, not closed')
  await threePings
  t.equal(answering.readyState, WebSocket.OPEN, 'the answering peer is still open after three pings')
})
