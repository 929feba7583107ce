import t from 'tap'
import { Redis } from 'ioredis'
import WebSocket from 'ws'
import { JobProgressClient } from '../client/index'
import { openJobStream, StreamBackpressureError, StreamLimitError, STREAM_LIMITS } from '../lib/index'
import { appendChunks } from '../lib/channels/streams/stream-store'
import { Keys } from '../lib/core/keys'
import { eventually, JOBS_PATH, jobsClient, redisClient, twoApps, uploadAs } from './helpers/index'

// The stream writer: chunks written while a store is in flight go to Redis together, in the order
// of the calls, with absolute offsets; limits cut a batch at the chunk that crosses them; the queue
// of chunks waiting in the writer's process is bounded (write() refuses, pipe() waits). And the
// client asks again when a chunk arrives past the one it expects.

/** RPUSH calls Redis ran so far, inside scripts included: one per append script call that stores. */
async function rpushCalls (r: Redis): Promise<number> {
  return Number(/cmdstat_rpush:calls=(\d+)/.exec(await r.info('commandstats'))?.[1] ?? 0)
}

const range = (from: number, to: number): number[] => Array.from({ length: to - from }, (_, i) => from + i)
const offsetsOf = (messages: any[], name = 'out'): number[] => messages.filter(m => m.type === 'stream' && m.name === name).map(m => m.offset)

for (const pubsub of ['classic', 'sharded'] as const) {
  t.test(`${pubsub} pub/sub: writes not awaited go in batches: offsets in call order, every chunk relayed, a few script calls`, async (t) => {
    const { redis, a } = await twoApps(t, { pubsub })
    const jobId = await uploadAs(a, 'key-alice')
    const r = redisClient(t, redis)
    const watcher = await jobsClient(t, a, 'key-alice')
    watcher.send({ action: 'subscribe', job_id: jobId, streams: { out: 0 } })
    await watcher.waitFor(m => m.type === 'subscribed')
    const s = openJobStream(r, { queue: 'batch', jobId, name: 'out', pubsub })
    const before = await rpushCalls(r)
    const offsets = await Promise.all(range(0, 300).map(async i => await s.write(i % 2 === 0 ? `c${i}` : { i })))
    t.same(offsets, range(0, 300), 'each write resolves with its offset, in the order of the calls')
    const pushes = await rpushCalls(r) - before
    t.ok(pushes <= 10, `300 chunks stored in ${pushes} script calls`)
    t.same(await r.lrange(`bull:batch:${jobId}:jp-stream:out`, 0, -1), range(0, 300).map(i => JSON.stringify(i % 2 === 0 ? `c${i}` : { i })), 'stored in order')
    await s.end()
    await watcher.waitFor(m => m.type === 'stream_end')
    t.same(offsetsOf(watcher.messages), range(0, 300), 'the watcher got each chunk once, in order')
  })
}

t.test('a batch that crosses a limit: the chunks before it stored, that one gets the limit error, the next ones find the stream ended', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const r = redisClient(t, redis)
  const s = openJobStream(r, { queue: 'batch', jobId, name: 'small', limits: { maxChunks: 5 } })
  const results = await Promise.allSettled(range(0, 8).map(async i => await s.write(`c${i}`)))
  t.same(results.slice(0, 5).map(x => x.status === 'fulfilled' ? x.value : -1), range(0, 5))
  t.match(results[5], { status: 'rejected', reason: { message: /maxChunks \(5 chunks\): ended/ } }, 'the chunk that crosses it')
  t.ok((results[5] as PromiseRejectedResult).reason instanceof StreamLimitError)
  t.match(results.slice(6), [{ status: 'rejected', reason: { message: /has ended/ } }, { status: 'rejected', reason: { message: /has ended/ } }])
  t.equal(await r.llen(`bull:batch:${jobId}:jp-stream:small`), 5)
  t.equal(await r.hget(`bull:batch:${jobId}:jp-stream:small:meta`, 'end'), 'limit')

  const bytes = openJobStream(r, { queue: 'batch', jobId, name: 'bytes', limits: { maxBytes: 30 } })
  const b = await Promise.allSettled(range(0, 4).map(async () => await bytes.write('0123456789')))
  t.same(b.map(x => x.status), ['fulfilled', 'fulfilled', 'rejected', 'rejected'])
  t.match((b[2] as PromiseRejectedResult).reason, { message: /maxBytes \(30 bytes\)/ })
})

t.test('the queue is bounded: write() past maxQueuedBytes refuses; pipe() waits, stores everything in order, in batches', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const r = redisClient(t, redis)
  const s = openJobStream(r, { queue: 'batch', jobId, name: 'w', limits: { maxQueuedBytes: 100 } })
  const writes = range(0, 20).map(async i => await s.write(`chunk-${i}`))
  const settled = await Promise.allSettled(writes)
  const refused = settled.filter(x => x.status === 'rejected')
  t.ok(refused.length > 0 && refused.every(x => x.reason instanceof StreamBackpressureError), `${refused.length} of 20 refused with StreamBackpressureError`)
  t.match(refused[0], { reason: { message: /maxQueuedBytes \(100\); await write\(\) or use pipe\(\)/ } })
  t.equal(await r.llen(`bull:batch:${jobId}:jp-stream:w`), 20 - refused.length, 'the others stored')
  t.equal(await s.write('after'), 20 - refused.length, 'and the stream goes on')

  const key = `bull:batch:${jobId}:jp-stream:p`
  const p = openJobStream(r, { queue: 'batch', jobId, name: 'p', limits: { maxQueuedBytes: 200 } })
  let ahead = 0
  const before = await rpushCalls(r)
  await p.pipe((async function * () {
    for (let i = 0; i < 2000; i++) {
      if (i % 100 === 0) ahead = Math.max(ahead, i - await r.llen(key))
      yield `chunk-${i}`
    }
  })())
  const pushes = await rpushCalls(r) - before
  t.same(await r.lrange(key, 0, -1), range(0, 2000).map(i => JSON.stringify(`chunk-${i}`)), 'every chunk, in order')
  t.ok(ahead <= 40, `the source was at most ${ahead} chunks ahead of Redis (200 bytes of 13-byte chunks, and a batch in flight)`)
  t.ok(pushes < 2000, `in ${pushes} script calls`)
  await t.rejects(openJobStream(r, { queue: 'batch', jobId: 'gone', name: 'p' }).pipe((async function * () { yield 'a'; yield 'b' })()), /no longer exists/, 'pipe throws the first error')
})

t.test('client: a chunk past the next expected one (those before it lost) asks again from the next', async (t) => {
  const { redis, a } = await twoApps(t)
  const jobId = await uploadAs(a, 'key-alice')
  const r = redisClient(t, redis)
  const s = openJobStream(r, { queue: 'batch', jobId, name: 'out' })
  const c = new JobProgressClient({ baseUrl: a.url, apiKey: 'key-alice', wsPath: JOBS_PATH, transports: ['websocket'], WebSocket: WebSocket as unknown as typeof globalThis.WebSocket })
  t.teardown(() => c.close())
  const watch = c.watch('batch', jobId)
  const got: unknown[] = []
  const reading = (async () => { for await (const value of watch.stream('out')) got.push(value) })()
  for (let i = 0; i < 5; i++) await s.write(`c${i}`)
  t.ok(await eventually(() => got.length === 5, 10_000), 'the first five live')
  // Chunks 5..7 stored but never relayed, and 7 reaching the client alone: what the client sees
  // when a message before it was lost. The server, never told of 5..7, sends nothing more.
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  await appendChunks(r, keys, 'batch', jobId, 'out', ['"c5"', '"c6"', '"c7"'], STREAM_LIMITS, null)
  watch._msg('stream', { type: 'stream', job_id: jobId, name: 'out', offset: 7, chunk: 'c7', ts: 0 })
  t.ok(await eventually(() => got.length === 8, 10_000), 'asked again from 5: the missing chunks arrive')
  await s.end()
  await reading
  t.same(got, range(0, 8).map(i => `c${i}`), 'each once, in order')
  c.close()
})
