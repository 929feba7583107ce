import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { createJobWorker, DiskStorage, jobsProtocol, type JobProgressOptions } from '../lib/index'
import { connect, lines, redisFor, startApp, startWorker, upload, type Client, type RedisServer } from './helpers/index'

// Isolation: a client that stops reading never holds up the others. Its pending progress is
// conflated (the newest replaces the older), final messages are kept, and a socket that does
// not drain within sendTimeoutMs is closed.

const PATH = '/ws/jobs'
/**
 * Larger than what the kernel buffers on loopback for a reader that has stopped (the sender's
 * buffer grows to net.ipv4.tcp_wmem's max, 4 MiB by default; the stopped receiver's stays near
 * its initial size), so this one message cannot be flushed while the client is paused.
 */
const BIG = 12 * 1024 * 1024

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown, opts: Partial<JobProgressOptions>) {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { protocols: [jobsProtocol({ path: PATH })], ...opts })
  return { redis, ...app }
}

/** A worker for `kind` whose jobs return `{ text }` of BIG bytes. */
function bigResultWorker (t: Teardown, redis: RedisServer, kind: string, uploadDir: string): void {
  const worker = createJobWorker({ kind, connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    await ctx.report(1, 1)
    return { text: 'x'.repeat(BIG) }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
}

async function watch (t: Teardown, ws: string, cookie: string | undefined, jobIds: string[]): Promise<Client> {
  const client = connect(t, `${ws}${PATH}`, { cookie })
  await client.waitFor(m => m.type === 'connected')
  for (const jobId of jobIds) {
    client.send({ action: 'subscribe', job_id: jobId })
    await client.waitFor(m => m.type === 'job_update' && m.job_id === jobId)
  }
  return client
}

/** Stops reading from the TCP socket: the server's writes pile up as they would for a stuck client. */
function stopReading (client: Client): void {
  (client.socket as unknown as { _socket: { pause: () => void } })._socket.pause()
}

function startReading (client: Client): void {
  (client.socket as unknown as { _socket: { resume: () => void } })._socket.resume()
}

t.test('a client that stops reading is closed after sendTimeoutMs; the other watcher gets everything', async (t) => {
  const sendTimeoutMs = 1000
  // Heartbeats keep coming while the big message (three times maxBufferedBytes) is flushed to
  // both: a message waiting behind it is not a client that does not read (neither is cut for
  // it), and the stuck one is cut by sendTimeoutMs alone, without a close frame.
  const { url, ws, app, redis, uploadDir } = await setup(t, { sendTimeoutMs, heartbeatIntervalMs: 100 })
  const up = await upload(`${url}/dataset/upload`, lines(1))
  const jobId = up.body.job_id
  const fast = await watch(t, ws, up.cookie, [jobId])
  const slow = await watch(t, ws, up.cookie, [jobId])
  stopReading(slow)

  bigResultWorker(t, redis, 'dataset', uploadDir)
  const started = Date.now()
  const final = await fast.waitFor(m => m.type === 'job_update' && m.status === 'succeeded', 30_000)
  t.equal(final.result.text.length, BIG, 'the fast client gets the whole final message')
  t.equal(fast.socket.readyState, 1, 'and stays connected')

  // The sweep closes the stuck socket; the server counts it gone.
  while (app.jobProgress.stats().sockets > 1 && Date.now() - started < 20_000) await sleep(20)
  const took = Date.now() - started
  t.equal(app.jobProgress.stats().sockets, 1, 'the slow client was closed')
  t.ok(took >= sendTimeoutMs, `not before sendTimeoutMs (${took} ms)`)
  t.equal(fast.socket.readyState, 1, 'the fast client is untouched')

  startReading(slow)
  const closed = await slow.closed
  t.equal(closed.code, 1006, 'terminated without a close frame: it could not have read one')
  t.notOk(slow.messages.some(m => m.status === 'succeeded'), 'the slow client never got the message it could not take')
})

t.test('a paused client gets conflated progress: fewer messages, monotonic, ending with the final one', async (t) => {
  // Long enough that nobody is closed here: this is about what a lagging client receives.
  const { url, ws, redis, uploadDir } = await setup(t, { sendTimeoutMs: 60_000, maxBufferedBytes: 64 * 1024 * 1024 })
  const big = await upload(`${url}/dataset/upload`, lines(1))
  const cookie = big.cookie
  const busy = await upload(`${url}/batch/upload`, lines(40), { cookie })
  const [bigId, busyId] = [big.body.job_id, busy.body.job_id]

  const slow = await watch(t, ws, cookie, [bigId, busyId])
  const fast = await watch(t, ws, cookie, [bigId, busyId])
  stopReading(slow)

  // The big final message fills the slow client's socket; once the fast client has it, the slow
  // client's copy is stuck in its send buffer, and everything after it has to wait in the outbox.
  bigResultWorker(t, redis, 'dataset', uploadDir)
  await fast.waitFor(m => m.job_id === bigId && m.status === 'succeeded', 30_000)
  const waitingFrom = slow.messages.length

  startWorker(t, redis, 'batch', uploadDir, { delayMs: 5 })
  await fast.waitFor(m => m.job_id === busyId && m.status === 'succeeded', 30_000)
  startReading(slow)
  await slow.waitFor(m => m.job_id === busyId && m.status === 'succeeded', 30_000)

  const fastUpdates = fast.messages.filter(m => m.type === 'job_update' && m.job_id === busyId)
  const slowUpdates = slow.messages.slice(waitingFrom).filter(m => m.type === 'job_update' && m.job_id === busyId)
  t.ok(fastUpdates.length > 40, `the fast client saw every step (${fastUpdates.length} updates)`)
  t.ok(slowUpdates.length < fastUpdates.length / 4, `the paused client got ${slowUpdates.length} conflated updates instead`)
  t.match(slowUpdates.at(-1), { status: 'succeeded', processed: 40, total: 40, result: { lines: 40 } }, 'its last message is the final one')
  const processed = slowUpdates.map(m => m.processed)
  t.same(processed, [...processed].sort((a, b) => a - b), 'processed never goes back')
  const bigFinal = slow.messages.find(m => m.job_id === bigId && m.status === 'succeeded')
  t.equal(bigFinal?.result.text.length, BIG, 'the stuck final message was delivered too, not dropped')
  t.equal(slow.socket.readyState, 1)
})
