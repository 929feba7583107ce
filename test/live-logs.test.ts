import t from 'tap'
import Fastify from 'fastify'
import WebSocket from 'ws'
import { JobProgressClient } from '../client/index'
import type { Redis } from 'ioredis'
import { createJobWorker, DiskStorage, jobProgress, jobsProtocol } from '../lib/index'
import { LogFeed } from '../lib/channels/logs/live-logs'
import type { LogMessage } from '../lib/wire/messages'
import { connect, eventually, gate, JOBS_PATH, jobsClient, lines, tempDir, TWO_APP_KEYS, twoApps, upload, uploadAs, type TestApp } from './helpers/index'
import { RedisCluster } from './helpers/redis-cluster'
import { sse } from './helpers/sse'
import type { RedisServer } from './helpers/redis'

// Live job logs: lines the worker helper's log() writes reach the watchers that asked for them,
// each with its absolute offset, caught up from the job's log list and then live; a watcher that
// falls behind gets a logs_truncated marker; ownership as everywhere.

const KEYS = TWO_APP_KEYS
const PATH = JOBS_PATH

/**
 * A worker whose processor writes the lines it is told to, when told: `write(n)` writes n more
 * lines and resolves with their offsets; `finish()` ends the job.
 */
function scriptedWorker (t: Teardown, redis: RedisServer, app: TestApp, warn?: (m: string) => void) {
  const steps: Array<{ n: number, line?: string, done: (offsets: number[]) => void }> = []
  let wake: (() => void) | null = null
  let finished = false
  let written = 0
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(app.uploadDir), ...(warn !== undefined ? { warn } : {}) }, async (ctx) => {
    await ctx.report(0, 1)
    for (;;) {
      const step = steps.shift()
      if (step === undefined) {
        if (finished) break
        await new Promise<void>(resolve => { wake = resolve })
        continue
      }
      const offsets: number[] = []
      for (let i = 0; i < step.n; i++) offsets.push(await ctx.log(step.line ?? `line ${written++}`))
      step.done(offsets)
    }
    await ctx.report(1, 1)
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  const poke = (): void => { const w = wake; wake = null; w?.() }
  return {
    write: async (n: number, line?: string) => await new Promise<number[]>(resolve => { steps.push({ n, line, done: resolve }); poke() }),
    finish: () => { finished = true; poke() }
  }
}

const logsOf = (messages: any[], jobId: string): any[] => messages.filter(m => m.type === 'log' && m.job_id === jobId)

t.test('lines reach the jobs protocol and SSE with their offsets, only when asked; a foreign job gets nothing', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  t.same(await worker.write(2), [0, 1])

  const asked = await jobsClient(t, b, 'key-alice')
  asked.send({ action: 'subscribe', job_id: jobId, logs: true })
  const plain = await jobsClient(t, b, 'key-alice')
  plain.send({ action: 'subscribe', job_id: jobId })
  const stream = await sse(t, `${a.url}/batch/${jobId}/events?logs=1&api_key=key-alice`)
  const quiet = await sse(t, `${a.url}/batch/${jobId}/events?api_key=key-alice`)
  const bob = await jobsClient(t, a, 'key-bob')
  bob.send({ action: 'subscribe', job_id: jobId, logs: true })

  // Caught up from the list: the two lines written before anyone watched.
  await asked.waitFor(m => m.type === 'log' && m.offset === 1)
  await stream.waitFor(e => e.event === 'log' && e.data.offset === 1)
  await plain.waitFor(m => m.type === 'job_update')
  await quiet.waitFor(e => e.event === 'job_update')
  const error = await bob.waitFor(m => m.type === 'error')
  t.match(error.message, /not found/i, "somebody else's job: not found")

  // Then live, written on another instance's worker.
  t.same(await worker.write(3), [2, 3, 4])
  await asked.waitFor(m => m.type === 'log' && m.offset === 4)
  await stream.waitFor(e => e.event === 'log' && e.data.offset === 4)
  t.same(logsOf(asked.messages, jobId).map(m => [m.offset, m.line]), [[0, 'line 0'], [1, 'line 1'], [2, 'line 2'], [3, 'line 3'], [4, 'line 4']], 'jobs protocol: every line once, in order, with its offset')
  t.same(stream.events.filter(e => e.event === 'log').map(e => [e.id, e.data.offset, e.data.line]), [0, 1, 2, 3, 4].map(i => [`${jobId}@log.${i}`, i, `line ${i}`]), 'SSE: `log` events whose id names the offset')

  worker.finish()
  await plain.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  await quiet.ended
  t.same(logsOf(plain.messages, jobId), [], 'a subscription without logs gets no lines')
  t.equal(quiet.events.filter(e => e.event === 'log').length, 0, 'a stream without ?logs gets no lines')
  t.same(logsOf(bob.messages, jobId), [], 'the other owner got no line')

  asked.send({ action: 'subscribe', job_id: jobId, logs: 'yes' })
  const bad = await asked.waitFor(m => m.type === 'error' && /logs must be/.test(m.message))
  t.ok(bad, 'a malformed logs option: a clear error, the socket stays')
})

t.test('a reconnect mid-log resumes from the last offset on the other instance: no gap, no duplicate', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  const first = await jobsClient(t, a, 'key-alice')
  first.send({ action: 'subscribe', job_id: jobId, logs: true })
  await first.waitFor(m => m.type === 'job_update')
  await worker.write(10)
  await first.waitFor(m => m.type === 'log' && m.offset === 9)
  const firstLines = logsOf(first.messages, jobId)
  first.close()
  // Written while nobody watches.
  await worker.write(5)
  const last = firstLines[firstLines.length - 1].offset as number
  const second = await jobsClient(t, b, 'key-alice')
  second.send({ action: 'subscribe', job_id: jobId, logs: { from: last + 1 } })
  await second.waitFor(m => m.type === 'log' && m.offset === 14)
  // And live again, with lines racing the catch-up.
  const more = worker.write(20)
  await second.waitFor(m => m.type === 'log' && m.offset === 34)
  await more
  const all = [...firstLines, ...logsOf(second.messages, jobId)].map(m => m.offset)
  t.same(all, Array.from({ length: 35 }, (_, i) => i), 'offsets 0..34 exactly once each, in order')

  // SSE: the browser's own reconnect sends the last line's id back, and the stream goes on after it.
  const stream = await sse(t, `${b.url}/batch/${jobId}/events?logs=1&api_key=key-alice`, { 'last-event-id': `${jobId}@log.30` })
  await worker.write(2)
  await stream.waitFor(e => e.event === 'log' && e.data.offset === 36)
  t.same(stream.events.filter(e => e.event === 'log').map(e => e.data.offset), [31, 32, 33, 34, 35, 36], 'resumed after Last-Event-ID')
  const explicit = await sse(t, `${a.url}/batch/${jobId}/events?logs_from=35&api_key=key-alice`)
  worker.finish()
  await explicit.ended
  t.same(explicit.events.filter(e => e.event === 'log').map(e => e.data.offset), [35, 36], 'logs_from: from that offset; the stream ends after the final state')
})

t.test('a catch-up over its cap sends the newest lines and a logs_truncated marker naming the rest', async (t) => {
  const { redis, a } = await twoApps(t, { liveLogs: { maxCatchUpLines: 5 } })
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  await worker.write(20)
  const client = await jobsClient(t, a, 'key-alice')
  client.send({ action: 'subscribe', job_id: jobId, logs: { from: 3 } })
  await client.waitFor(m => m.type === 'log' && m.offset === 19)
  const marker = client.messages.find(m => m.type === 'logs_truncated')
  t.match(marker, { job_id: jobId, from: 3, next: 15 }, 'the marker names the skipped lines')
  t.same(logsOf(client.messages, jobId).map(m => m.offset), [15, 16, 17, 18, 19])
  const page = await (await fetch(`${a.url}/batch/${jobId}/logs?from=${marker.from as number}&limit=${(marker.next as number) - (marker.from as number)}&api_key=key-alice`)).json()
  t.same(page.logs, Array.from({ length: 12 }, (_, i) => `line ${i + 3}`), 'the skipped lines are in the logs route, from the marker\'s offset')
  worker.finish()
})

t.test('a watcher that does not read: lines stop, and once it reads again one logs_truncated names what it missed', async (t) => {
  // The feed itself, against a backlog the test controls (a real socket's kernel buffers are too
  // large to fill deterministically).
  const sent: LogMessage[] = []
  let backlog = 0
  const written: string[] = []
  const feed = new LogFeed({
    jobId: 'j',
    request: { from: 0 },
    read: async (from, limit) => ({ from, first: 0, total: written.length, lines: written.slice(from, from + limit) }),
    send: (m) => sent.push(m),
    backlog: () => backlog,
    maxBacklogBytes: 1000,
    maxCatchUpLines: 100,
    onError: (err) => { throw err }
  })
  t.teardown(() => feed.close())
  const write = (n: number): void => {
    for (let i = 0; i < n; i++) {
      written.push(`l${written.length}`)
      feed.live(written.length - 1, written[written.length - 1])
    }
  }
  write(2)
  await feed.finish()
  t.same(sent.map(m => m.type === 'log' ? m.offset : -1), [0, 1], 'caught up')
  write(1)
  backlog = 5000
  write(10)
  t.equal(sent.length, 3, 'nothing more while the watcher is behind')
  backlog = 0
  await new Promise(resolve => setTimeout(resolve, 120))
  t.match(sent[3], { type: 'logs_truncated', from: 3, next: 13 }, 'then the marker, with the offset to fetch from')
  write(1)
  t.match(sent[4], { type: 'log', offset: 13 }, 'and live lines again')
  // A line that was lost on the way: the list is read again from the first missing offset.
  written.push('l14', 'l15')
  feed.live(15, 'l15')
  await new Promise(resolve => setImmediate(resolve))
  await feed.finish()
  t.same(sent.slice(5).map(m => m.type === 'log' ? m.offset : -1), [14, 15], 'a gap is filled from the list')
})

t.test('a line over the limit is stored and relayed cut, and the worker is warned', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const warnings: string[] = []
  const worker = scriptedWorker(t, redis, a, (m) => warnings.push(m))
  const client = await jobsClient(t, a, 'key-alice')
  client.send({ action: 'subscribe', job_id: jobId, logs: true })
  await client.waitFor(m => m.type === 'job_update')
  await worker.write(1, 'x'.repeat(20_000))
  const line = await client.waitFor(m => m.type === 'log' && m.offset === 0)
  t.equal(line.line.length, 8192, 'cut to 8,192 characters')
  t.ok(line.line.endsWith(' [cut]'), 'ending with the mark')
  t.match(warnings[0], /20000 characters is over the limit/)
  const page = await (await fetch(`${a.url}/batch/${jobId}/logs?api_key=key-alice`)).json()
  t.equal(page.logs[0], line.line, 'stored as relayed')
  worker.finish()
})

t.test('on a Redis Cluster: lines relayed with SPUBLISH, the owner index in the queue\'s slot, the owner feed on sharded pub/sub', async (t) => {
  const cluster = await RedisCluster.start(t)
  const uploadDir = await tempDir(t, 'jp-uploads-')
  const apps = await Promise.all([0, 1].map(async () => {
    const connection = cluster.client()
    const app = Fastify({ logger: false })
    await app.register(jobProgress, { connection, prefix: '{jpc}', kinds: { batch: {} }, apiKeys: KEYS, protocols: [jobsProtocol({ path: PATH })], throttleMs: 0, sweepReadsPerSecond: 0, uploadDir })
    await app.listen({ port: 0, host: '127.0.0.1' })
    t.teardown(async () => {
      await app.close()
      connection.disconnect()
    })
    const { port } = app.server.address() as { port: number }
    return { app, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}` }
  }))
  const [a, b] = apps
  const mine = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await mine.waitFor(m => m.type === 'connected')
  mine.send({ action: 'subscribe_mine' })
  await mine.waitFor(m => m.type === 'subscribed' && m.job_id === 'mine')
  const up = await upload(`${a.url}/batch/upload`, lines(1), { headers: { authorization: 'Bearer key-alice' } })
  const jobId: string = up.body.job_id
  await mine.waitFor(m => m.type === 'my_job' && m.job_id === jobId && m.created === true)

  const release = gate()
  const logged = gate<number[]>()
  const connection = cluster.client()
  const worker = createJobWorker({ kind: 'batch', prefix: '{jpc}', connection: connection as unknown as Redis, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    await ctx.report(0, 1)
    logged.open([await ctx.log('first'), await ctx.log('second')])
    await release.promise
    await ctx.log('third')
    return {}
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    await worker.close(true)
    connection.disconnect()
  })
  t.same(await logged.promise, [0, 1])
  const watcher = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await watcher.waitFor(m => m.type === 'connected')
  watcher.send({ action: 'subscribe', job_id: jobId, logs: true })
  await watcher.waitFor(m => m.type === 'log' && m.offset === 1)
  release.open()
  await watcher.waitFor(m => m.type === 'log' && m.offset === 2 && m.line === 'third')
  await mine.waitFor(m => m.type === 'my_job' && m.job_id === jobId && m.status === 'succeeded')
  t.same(logsOf(watcher.messages, jobId).map(m => m.line), ['first', 'second', 'third'], 'caught up, then live through the shard')
  const res = await fetch(`${b.url}/job-progress/jobs?api_key=key-alice`)
  const body = await res.json()
  t.same(body.jobs?.map((j: any) => [j.job_id, j.status]), [[jobId, 'succeeded']], 'listed from the index in the queue\'s slot')
})

t.test('lines published while the subscriber reconnects are read from the list once it is back', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  await worker.write(1)
  const client = await jobsClient(t, b, 'key-alice')
  client.send({ action: 'subscribe', job_id: jobId, logs: true })
  await client.waitFor(m => m.type === 'log' && m.offset === 0)
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  const list = await admin.client('LIST') as string
  const subs = list.split('\n').filter(l => /\bsub=[1-9]/.test(l)).map(l => /\bid=(\d+)/.exec(l)?.[1] as string)
  // Both instances' subscribers: whichever holds the channel, its lines are published while it is away.
  for (const id of subs) await admin.call('CLIENT', 'KILL', 'ID', id)
  // ioredis reconnects after 50 ms; these lines are written before, and nothing follows them.
  t.same(await worker.write(3), [1, 2, 3])
  await client.waitFor(m => m.type === 'log' && m.offset === 3, 10_000)
  t.same(logsOf(client.messages, jobId).map(m => m.offset), [0, 1, 2, 3], 'every line once')
  worker.finish()
})

t.test('a watcher that has the final state has every line: the last lines come before it, live or after the end', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  const live = await jobsClient(t, b, 'key-alice')
  live.send({ action: 'subscribe', job_id: jobId, logs: true })
  await live.waitFor(m => m.type === 'job_update' && m.status === 'running')
  // Lines written right before the job completes: their relay races the completion's.
  await worker.write(5)
  worker.finish()
  await live.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  const order = (messages: any[]): string[] => messages.filter(m => m.type === 'log' || (m.type === 'job_update' && m.status === 'succeeded')).map(m => m.type === 'log' ? `log ${m.offset as number}` : 'final')
  t.same(order(live.messages), ['log 0', 'log 1', 'log 2', 'log 3', 'log 4', 'final'], 'live: every line, then the final state')
  const late = await jobsClient(t, a, 'key-alice')
  late.send({ action: 'subscribe', job_id: jobId, logs: { from: 2 } })
  await late.waitFor(m => m.type === 'job_update')
  t.same(order(late.messages), ['log 2', 'log 3', 'log 4', 'final'], 'after the end: the lines asked for, then the final state')
  const stream = await sse(t, `${b.url}/job-progress/events?jobs=${jobId}&logs=1&api_key=key-alice`)
  await stream.ended
  t.same(stream.events.filter(e => e.event !== 'close').map(e => e.event === 'log' ? `log ${e.data.offset as number}` : e.data.status), ['log 0', 'log 1', 'log 2', 'log 3', 'log 4', 'succeeded'], 'SSE: the same order, then the stream ends')
})

t.test('the client: watch.onLog gets every line once, in order, then the final state, over WebSocket and SSE', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const worker = scriptedWorker(t, redis, a)
  await worker.write(3)
  const got: Record<string, number[]> = { websocket: [], sse: [] }
  const dones: Array<Promise<unknown>> = []
  for (const transport of ['websocket', 'sse'] as const) {
    const client = new JobProgressClient({ baseUrl: a.url, apiKey: 'key-alice', wsPath: PATH, transports: [transport], WebSocket: WebSocket as unknown as typeof globalThis.WebSocket })
    t.teardown(() => client.close())
    const watch = client.watch('batch', jobId)
    watch.onLog((m) => { if (m.type === 'log') got[transport].push(m.offset) })
    dones.push(watch.done.then(() => [...got[transport]]))
  }
  await eventually(() => got.websocket.length === 3 && got.sse.length === 3)
  await worker.write(2)
  worker.finish()
  t.same(await Promise.all(dones), [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]], 'every line once and in order before done resolves, on both transports')
})
