import t from 'tap'
import { once } from 'node:events'
import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { Bridge, relayMessage } from '../lib/bridge/bridge'
import { relayEntryId, resyncMessage } from '../lib/wire/relay'
import { Keys } from '../lib/core/keys'
import { connect, lines, redisFor, startApp, startWorker, tempDir, upload } from './helpers/index'

t.test('relayMessage: progress is spliced in as JSON, lifecycle events carry only their name', async (t) => {
  t.same(JSON.parse(relayMessage('1700000000000-0', ['event', 'progress', 'jobId', 'j1', 'data', '{"processed":3,"total":9}'])?.payload ?? ''), { v: 2, e: 'progress', t: 1700000000000, i: '1700000000000-0', d: { processed: 3, total: 9 } })
  t.same(relayMessage('5-1', ['event', 'completed', 'jobId', 'j1', 'returnvalue', '{"big":"x"}']), { jobId: 'j1', payload: '{"v":2,"e":"completed","t":5,"i":"5-1"}' })
  t.equal(relayMessage('5-1', ['event', 'drained']), null, 'events without a job are not relayed')
  t.equal(relayMessage('5-1', ['event', 'added', 'jobId', 'j1']), null, 'events no watcher needs are not relayed')
})

t.test('relayEntryId reads the entry id of this version\'s own messages without parsing, and nothing else', async (t) => {
  const own = (id: string, fields: string[]): string => relayMessage(id, fields)?.payload ?? ''
  const rows: Array<[string, string | null, string]> = [
    [own('1700000000000-0', ['event', 'progress', 'jobId', 'j', 'data', '{"processed":3,"i":"9-9"}']), '1700000000000-0', 'progress'],
    [own('5-12', ['event', 'completed', 'jobId', 'j']), '5-12', 'lifecycle'],
    [own('5-1', ['event', 'progress', 'jobId', 'j', 'data', '7']), '5-1', 'progress as a number'],
    [resyncMessage('trim', 5), null, 'resync: no id'],
    ['{"e":"progress","t":5,"i":"5-1","d":1}', null, 'version 1: parsed instead'],
    ['{"v":3,"e":"progress","t":5,"i":"5-1"}', null, 'a later version: parsed instead'],
    ['{"v":2,"e":"progress","t":5,"d":{"i":"9-9"},"i":"5-1"}', null, 'fields in another order: parsed instead'],
    ['{"v":2,"e":"progress","t":5,"i":"bad"}', null, 'not an entry id'],
    ['{"v":2,"e":"progress","t":5,"i":"5-1', null, 'cut short'],
    ['{"v":2,"e":"progress"', null, 'cut shorter']
  ]
  for (const [raw, id, name] of rows) t.equal(relayEntryId(raw), id, name)
})

t.test('relayed entries are acknowledged together, and every one of them', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  const blocking = redis.client()
  t.teardown(() => { r.disconnect(); blocking.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  // Relayed from Node (as on a cluster): the ordered relay acknowledges in its script.
  const bridge = new Bridge({ redis: r, blocking, keys, queues: ['batch'], group: 'jp-bridge', consumer: 'me', blockMs: 50, claimIdleMs: 10_000, claimIntervalMs: 10_000, consumerIdleMs: 60_000, ordered: false, log: Fastify().log })
  t.teardown(async () => await bridge.close())
  await bridge.start()
  const stats = async (): Promise<Record<string, number>> => {
    const info = await r.info('commandstats')
    return Object.fromEntries(['xack', 'publish'].map(c => [c, Number(new RegExp(`cmdstat_${c}:calls=(\\d+)`).exec(info)?.[1] ?? 0)]))
  }
  const before = await stats()
  // 200 events, one at a time as a worker writes them: read in many small batches, each sent
  // with the next read ...
  for (let i = 0; i < 200; i++) await r.xadd(stream, '*', 'event', 'progress', 'jobId', `j${i % 5}`, 'data', String(i))
  // ... and 300 more in bursts, read several at a time (the busy path).
  for (let k = 0; k < 3; k++) {
    const burst = r.pipeline()
    for (let i = 0; i < 100; i++) burst.xadd(stream, '*', 'event', 'progress', 'jobId', `j${i % 5}`, 'data', String(i))
    await burst.exec()
  }
  for (;;) {
    const [count] = await r.xpending(stream, 'jp-bridge') as [number]
    const info = await r.xinfo('GROUPS', stream) as Array<Array<string | number>>
    const lag = info[0][info[0].indexOf('lag') + 1]
    if (count === 0 && lag === 0) break
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  const after = await stats()
  t.equal(bridge.published, 500)
  t.equal(after.publish - before.publish, 500, 'one PUBLISH per event')
  t.ok(after.xack - before.xack < 50, `every entry acknowledged in ${after.xack - before.xack} XACKs, not one per read`)
})

t.test('a burst whose PUBLISHes Redis refused is not acknowledged: its entries stay pending for a replay', async (t) => {
  const redis = await redisFor(t)
  const admin = redis.client()
  // The command connection's user may do everything but PUBLISH: the busy path's pipeline then
  // resolves with an error per command, which must not count as sent.
  await admin.call('ACL', 'SETUSER', 'relay', 'on', '>relay-pw', '~*', '&*', '+@all', '-publish')
  const r = new Redis({ port: redis.port, username: 'relay', password: 'relay-pw', maxRetriesPerRequest: null })
  const blocking = redis.client()
  t.teardown(() => { admin.disconnect(); r.disconnect(); blocking.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  const bridge = new Bridge({ redis: r, blocking, keys, queues: ['batch'], group: 'jp-bridge', consumer: 'me', blockMs: 50, claimIdleMs: 60_000, claimIntervalMs: 60_000, consumerIdleMs: 60_000, ordered: false, log: Fastify({ logger: { level: 'silent' } }).log })
  t.teardown(async () => await bridge.close())
  await bridge.start()
  // In one transaction, so the blocked read wakes once and takes all six (the busy path).
  const burst = admin.multi()
  for (let i = 0; i < 6; i++) burst.xadd(stream, '*', 'event', i < 5 ? 'progress' : 'completed', 'jobId', 'j1', 'data', String(i))
  await burst.exec()
  while (bridge.published < 6) await new Promise(resolve => setTimeout(resolve, 10))
  // PUBLISH allowed again; one entry alone goes out with the next read and is acknowledged,
  // with whatever acknowledgements were queued before it.
  await admin.call('ACL', 'SETUSER', 'relay', '+publish')
  const sentinel = await admin.xadd(stream, '*', 'event', 'progress', 'jobId', 'j2', 'data', '1') as string
  for (;;) {
    const pending = await admin.xpending(stream, 'jp-bridge', '-', '+', 100) as Array<[string]>
    if (bridge.published >= 7 && !pending.some(([id]) => id === sentinel)) {
      t.equal(pending.length, 6, 'the six refused entries are still pending')
      break
    }
    await new Promise(resolve => setTimeout(resolve, 20))
  }
})

t.test('events a dead instance read but never published are claimed and relayed by another', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  // The instance clients watch through: no bridge of its own, and a reconcile too slow to help.
  const watcher = await startApp(t, redis, { uploadDir, bridge: { enabled: false }, sweepReadsPerSecond: 0 })
  // Made once so the consumer group exists, then gone.
  const first = await startApp(t, redis, { uploadDir })
  await first.app.close()

  const up = await upload(`${watcher.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  const worker = startWorker(t, redis, 'batch', uploadDir)
  await once(worker, 'completed')

  // A consumer reads every event and dies before publishing or acknowledging any of them.
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const read = await r.xreadgroup('GROUP', 'jp-bridge', 'dead-instance', 'COUNT', 1000, 'STREAMS', 'bull:batch:events', '>') as Array<[string, unknown[]]>
  t.ok(read[0][1].length > 0, 'the dead consumer holds the events')
  t.equal(client.messages.some(m => m.status === 'complete'), false, 'nothing was relayed yet')

  // Another instance's bridge claims them after claimIdleMs and publishes: the watcher converges.
  await startApp(t, redis, { uploadDir, bridge: { claimIdleMs: 200, claimIntervalMs: 100, consumerIdleMs: 300 } })
  const final = await client.waitFor(m => m.status === 'complete', 10_000)
  t.equal(final.processed, 3)
  t.equal((await client.closed).code, 1000)

  // And the dead consumer, holding nothing any more, leaves the group.
  const deadline = Date.now() + 10_000
  let names: string[] = []
  while (Date.now() < deadline) {
    const rows = await r.xinfo('CONSUMERS', 'bull:batch:events', 'jp-bridge') as Array<Array<string | number>>
    names = rows.map(row => String(row[row.indexOf('name') + 1]))
    if (!names.includes('dead-instance')) break
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  t.notOk(names.includes('dead-instance'), 'the dead consumer was removed')
})

t.test('events this instance\'s bridge publishes from Node reach its own sockets directly, once each', async (t) => {
  const redis = await redisFor(t)
  // Publishing from Node, as on a cluster (the ordered relay publishes in Redis: nothing to hand over).
  const { app, url, uploadDir } = await startApp(t, redis, { bridge: { ordered: false } })
  const up = await upload(`${url}/batch/upload`, lines(4))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  startWorker(t, redis, 'batch', uploadDir)
  await client.closed
  const stats = app.jobProgress.stats()
  t.ok(stats.relayedLocally > 0, 'the bridge handed its events to the local hub')
  t.ok(stats.relayedLocally >= 5, 'its 4 progress events and the completion went straight to the watched job')
  t.ok(stats.relayedLocally <= stats.relayed, 'only events it published, and only for jobs watched here')
  t.same(client.messages.filter(m => m.status === 'processing').map(m => m.processed), [0, 1, 2, 3, 4], 'the copy back from Redis is not delivered twice')
  t.equal(client.messages.filter(m => m.status === 'complete').length, 1)
})

t.test('an event whose listener fails is not acknowledged: it stays pending and is replayed', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  const blocking = redis.client()
  t.teardown(() => { r.disconnect(); blocking.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  const seen: string[] = []
  let failures = 1
  const replayed = new Promise<void>(resolve => {
    const bridge = new Bridge({
      redis: r,
      blocking,
      keys,
      queues: ['batch'],
      group: 'jp-bridge',
      consumer: 'me',
      blockMs: 50,
      claimIdleMs: 200,
      claimIntervalMs: 100,
      consumerIdleMs: 60_000,
      log: Fastify().log,
      onEvent: (event) => {
        if (!event.final) return
        seen.push(event.id)
        if (failures-- > 0) throw new Error('webhook queue unavailable')
        resolve()
      }
    })
    t.teardown(async () => await bridge.close())
    void bridge.start().then(async () => await r.xadd(stream, '*', 'event', 'completed', 'jobId', 'j1', 'returnvalue', '1'))
  })
  await replayed
  t.equal(seen.length, 2, 'the listener saw the entry twice: once failing, once on the replay')
  t.equal(seen[0], seen[1], 'the same stream entry')
  // Acknowledged after the replay succeeded.
  for (;;) {
    const [count] = await r.xpending(stream, 'jp-bridge') as [number]
    if (count === 0) break
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.pass('acknowledged once a listener succeeded')
})

t.test('an event whose listener fails is called again as soon as the command connection is back, not after claimIdleMs', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  const blocking = redis.client()
  t.teardown(() => { r.disconnect(); blocking.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  const calls: number[] = []
  let delivered!: () => void
  const done = new Promise<void>(resolve => { delivered = resolve })
  // No claim within the test: only the bridge's own retry can bring the event back.
  const bridge = new Bridge({
    redis: r,
    blocking,
    keys,
    queues: ['batch'],
    group: 'jp-bridge',
    consumer: 'me',
    blockMs: 50,
    claimIdleMs: 60_000,
    claimIntervalMs: 60_000,
    consumerIdleMs: 60_000,
    log: Fastify().log,
    onEvent: async (event) => {
      if (!event.final) return
      calls.push(Date.now())
      // The first call finds the command connection dropping (as after a Redis restart), the
      // second fails on its own; the third succeeds.
      if (calls.length === 1) {
        r.disconnect(true)
        throw new Error('Stream isn\'t writeable and enableOfflineQueue options is false')
      }
      if (calls.length === 2) throw new Error('webhook queue unavailable')
      delivered()
    }
  })
  t.teardown(async () => await bridge.close())
  await bridge.start()
  const added = Date.now()
  await blocking.xadd(stream, '*', 'event', 'completed', 'jobId', 'j1', 'returnvalue', '1')
  let timer: NodeJS.Timeout | undefined
  const called = await Promise.race([done.then(() => true), new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(false), 10_000) })])
  clearTimeout(timer)
  t.ok(called, `the listener succeeded within 10 s (called ${calls.length} times)`)
  t.equal(calls.length, 3, 'called again after each failure')
  t.ok(calls[2] - added < 3_000, `the final reached the listener ${calls[2] - added} ms after it was written (claimIdleMs is 60 s)`)
  for (;;) {
    const [count] = await blocking.xpending(stream, 'jp-bridge') as [number]
    if (count === 0) break
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.pass('acknowledged once the listener succeeded')
})
