import t from 'tap'
import WebSocket from 'ws'
import { JobProgressClient } from '../client/index'
import { createJobWorker, DiskStorage, openJobStream, StreamLimitError } from '../lib/index'
import { eventually, gate, JOBS_PATH, jobsClient, redisClient, twoApps, uploadAs } from './helpers/index'
import { sse } from './helpers/sse'
import { StreamFeed } from '../lib/channels/streams/live-streams'
import type { StreamMessage } from '../lib/wire/streams'

// Named streams: chunks a worker writes with ctx.stream(name) reach watchers in order, each once,
// from any offset, over the jobs protocol, SSE (resumed by Last-Event-ID) and the stream route;
// limits end a stream visibly; ownership as for logs; every key expires.

const chunk = (i: number): unknown => i % 2 === 0 ? `token ${i} ` : { i }
const offsetsOf = (messages: any[], name = 'out'): number[] => messages.filter(m => m.type === 'stream' && m.name === name).map(m => m.offset)
const sseOffsets = (events: Array<{ event: string, data: any }>): number[] => events.filter(e => e.event === 'stream').map(e => e.data.offset)
const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i)

t.test('a worker streams 200 chunks: every watcher gets them in order, once, from its offset; SSE resumes; the route pages; ownership; expiry', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const first = gate()
  const second = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(a.uploadDir) }, async (ctx) => {
    await ctx.report(0, 2)
    await first.promise
    const out = ctx.stream('out')
    for (let i = 0; i < 100; i++) await out.write(chunk(i))
    await second.promise
    await out.pipe((async function * () { for (let i = 100; i < 200; i++) yield chunk(i) })())
    await out.end()
    await ctx.report(2, 2)
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())

  const early = await jobsClient(t, b, 'key-alice')
  early.send({ action: 'subscribe', job_id: jobId, streams: { out: 0 } })
  await early.waitFor(m => m.type === 'subscribed')
  const s1 = await sse(t, `${a.url}/batch/${jobId}/events?streams_from=out:0&api_key=key-alice`)
  first.open()
  const last = await s1.waitFor(e => e.event === 'stream' && e.data.offset === 99)
  t.equal(last.id, `${jobId}@stream.out.99`, 'a chunk\'s id names its stream and offset in its own namespace')
  s1.close()
  await s1.ended
  second.open()

  const final = await early.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  t.same(offsetsOf(early.messages), range(0, 200), 'the early watcher: every chunk, in order, once')
  const end = early.messages.findIndex(m => m.type === 'stream_end')
  t.ok(end >= 0 && end < early.messages.indexOf(final), 'stream_end comes before the final state')
  t.match(early.messages[end], { name: 'out', offset: 200, reason: 'done' })
  t.same(early.messages.find(m => m.type === 'stream' && m.offset === 1)?.chunk, { i: 1 }, 'JSON chunks arrive as values')
  t.equal(early.messages.find(m => m.type === 'stream' && m.offset === 0)?.chunk, 'token 0 ', 'string chunks as strings')

  // SSE after a disconnect: Last-Event-ID moves the stream on past the last chunk received.
  const s2 = await sse(t, `${b.url}/batch/${jobId}/events?streams_from=out:0&api_key=key-alice`, { 'last-event-id': last.id })
  await s2.waitFor(e => e.event === 'close')
  t.same([...sseOffsets(s1.events), ...sseOffsets(s2.events)], range(0, 200), 'SSE: no loss and no duplicate across the reconnect')
  t.ok(s2.events.some(e => e.event === 'stream_end'))

  const late = await jobsClient(t, a, 'key-alice')
  late.send({ action: 'subscribe', job_id: jobId, streams: { out: 150 } })
  await late.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  t.same(offsetsOf(late.messages), range(150, 200), 'a late watcher from 150 gets 150..199')

  const page1 = await (await fetch(`${a.url}/batch/${jobId}/streams/out?from=0&limit=80`, { headers: { authorization: 'Bearer key-alice' } })).json() as any
  t.match(page1, { job_id: jobId, name: 'out', count: 200, from: 0, next: 80 })
  t.equal(page1.chunks.length, 80)
  const page3 = await (await fetch(`${a.url}/batch/${jobId}/streams/out?from=160&limit=80`, { headers: { authorization: 'Bearer key-alice' } })).json() as any
  t.match(page3, { from: 160, next: 200, end: { reason: 'done', offset: 200 } })
  t.same(page3.chunks[1], { i: 161 })

  const foreign = await fetch(`${a.url}/batch/${jobId}/streams/out`, { headers: { authorization: 'Bearer key-bob' } })
  const foreignLogs = await fetch(`${a.url}/batch/${jobId}/logs`, { headers: { authorization: 'Bearer key-bob' } })
  t.equal(foreign.status, 404, 'a foreign owner gets 404')
  t.same(await foreign.json(), await foreignLogs.json(), 'answered like the logs route')
  const bob = await jobsClient(t, a, 'key-bob')
  bob.send({ action: 'subscribe', job_id: jobId, streams: { out: 0 } })
  await bob.waitFor(m => m.type === 'error')
  t.same(offsetsOf(bob.messages), [], 'and no chunk over a socket')

  const r = redisClient(t, redis)
  const keys = await r.keys(`bull:batch:${jobId}:jp-stream:*`)
  t.equal(keys.length, 2, 'the chunks and their meta')
  for (const key of keys) {
    const ttl = await r.ttl(key)
    t.ok(ttl > 0 && ttl <= 86_400, `${key} expires (${ttl} s)`)
  }
})

t.test('a limit reached: the writer gets an error, readers the limit marker; a chunk too large is refused', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const r = redisClient(t, redis)
  const watcher = await jobsClient(t, a, 'key-alice')
  watcher.send({ action: 'subscribe', job_id: jobId, streams: { small: 0 } })
  await watcher.waitFor(m => m.type === 'subscribed')
  const s = openJobStream(r, { queue: 'batch', jobId, name: 'small', limits: { maxChunks: 3, maxChunkBytes: 100 } })
  await t.rejects(s.write('x'.repeat(200)), StreamLimitError, 'a chunk over maxChunkBytes is refused')
  t.same([await s.write('a'), await s.write('b'), await s.write('c')], [0, 1, 2])
  await t.rejects(s.write('d'), StreamLimitError)
  await t.rejects(s.write('e'), StreamLimitError, 'and stays ended')
  const marker = await watcher.waitFor(m => m.type === 'stream_end')
  t.match(marker, { name: 'small', offset: 3, reason: 'limit', message: /maxChunks \(3/ })
  t.same(offsetsOf(watcher.messages, 'small'), [0, 1, 2])
  const page = await (await fetch(`${a.url}/batch/${jobId}/streams/small`, { headers: { authorization: 'Bearer key-alice' } })).json() as any
  t.match(page, { count: 3, end: { reason: 'limit', offset: 3 } })

  const bytes = openJobStream(r, { queue: 'batch', jobId, name: 'bytes', limits: { maxBytes: 20 } })
  await bytes.write('0123456789')
  await t.rejects(bytes.write('0123456789'), /maxBytes \(20/)
  t.ok(await eventually(async () => (await r.hget(`bull:batch:${jobId}:jp-stream:bytes:meta`, 'end')) === 'limit'))
})

for (const transport of ['websocket', 'sse'] as const) {
  t.test(`client over ${transport}: watch.stream(name) yields every chunk in order across a forced reconnect`, async (t) => {
    const { redis, a } = await twoApps(t)
    const jobId = await uploadAs(a, 'key-alice')
    const batches = [gate(), gate()]
    const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(a.uploadDir) }, async (ctx) => {
      const out = ctx.stream('out')
      for (let batch = 0; batch < 3; batch++) {
        if (batch > 0) await batches[batch - 1].promise
        for (let i = 0; i < 20; i++) await out.write(chunk(batch * 20 + i))
      }
      await out.end()
      return { ok: true }
    })
    worker.on('error', () => {})
    t.teardown(async () => await worker.close())
    const c = new JobProgressClient({ baseUrl: a.url, apiKey: 'key-alice', wsPath: JOBS_PATH, transports: [transport], WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, backoff: { minMs: 50, maxMs: 200 } })
    t.teardown(() => c.close())
    const got: unknown[] = []
    const reading = (async () => { for await (const value of c.watch('batch', jobId).stream('out')) got.push(value) })()
    const cut = async (): Promise<void> => {
      const before = c.connections
      for (const ws of (a.app as any).websocketServer?.clients ?? []) ws.terminate()
      a.app.server.closeAllConnections()
      t.ok(await eventually(() => c.connections > before, 5_000), 'reconnected')
    }
    t.ok(await eventually(() => got.length === 20, 10_000))
    await cut()
    batches[0].open()
    t.ok(await eventually(() => got.length >= 40, 10_000))
    await cut()
    batches[1].open()
    await reading
    t.same(got, range(0, 60).map(chunk), 'every chunk once, in order')
    // Closed here, client first: a close from the teardown waits for the client's stream to end.
    c.close()
    await a.app.close()
  })
}

t.test('a watcher that does not read: chunks are skipped, then one stream_truncated names them; memory does not grow', async (t) => {
  const stored = range(0, 10).map(i => `c${i}`)
  const sent: StreamMessage[] = []
  let backlog = 0
  const feed = new StreamFeed({
    jobId: 'j',
    name: 'out',
    from: 0,
    read: async (from, limit) => ({ from, total: stored.length, chunks: stored.slice(from, from + limit), end: null }),
    send: (m) => { sent.push(m) },
    backlog: () => backlog,
    maxBacklogBytes: 1000,
    onError: (err) => { throw err }
  })
  t.teardown(() => feed.close())
  feed.start()
  await feed.idle()
  t.same(sent.map(m => m.type === 'stream' ? m.offset : -1), range(0, 10), 'caught up')
  backlog = 5000
  for (let i = 10; i < 15; i++) { stored.push(`c${i}`); feed.live(i, `c${i}`) }
  t.equal(sent.length, 10, 'nothing more while the watcher does not read')
  backlog = 0
  t.ok(await eventually(() => sent.length === 11))
  t.match(sent[10], { type: 'stream_truncated', name: 'out', from: 10, next: 15 })
  stored.push('c15')
  feed.live(15, 'c15')
  t.match(sent[11], { type: 'stream', offset: 15 }, 'then live again')
})
