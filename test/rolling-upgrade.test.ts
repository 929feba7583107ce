import t from 'tap'
import { Redis } from 'ioredis'
import { Keys } from '../lib/core/keys'
import { parseRelay, relayMessage, RELAY_VERSION, resyncMessage } from '../lib/wire/relay'
import * as v1 from './fixtures/relay-v1'
import { connect, gate, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

// A rolling upgrade: instances of relay version 1 (test/fixtures/relay-v1.ts, the codec as the
// older instances run it) and of the current version share one Redis. Each reads the other's
// messages, so every client is served whichever instance relays its job's events.

const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
const PROGRESS = ['event', 'progress', 'jobId', 'j1', 'data', '{"processed":3,"total":9,"attempt":1}']

t.test('codec table: each version reads the other\'s messages and a later one\'s', async (t) => {
  const rows: Array<[string, string, unknown]> = [
    ['v1 progress read by this version', v1.relayMessage('7-0', PROGRESS)?.payload ?? '', { v: 1, e: 'progress', t: 7, i: '7-0', d: { processed: 3, total: 9, attempt: 1 } }],
    ['v1 final read by this version', v1.relayMessage('8-1', ['event', 'completed', 'jobId', 'j1'])?.payload ?? '', { v: 1, e: 'completed', t: 8, i: '8-1' }],
    ['a later version with fields of its own', '{"v":3,"e":"progress","t":9,"i":"9-0","d":{"processed":1,"total":2},"x":{"new":true}}', { v: 3, e: 'progress', t: 9, i: '9-0', d: { processed: 1, total: 2 } }],
    ['an unusable v is read as 1', '{"v":"2","e":"active","t":1,"i":"1-0"}', { v: 1, e: 'active', t: 1, i: '1-0' }]
  ]
  for (const [name, raw, expected] of rows) t.same(parseRelay(raw), expected, name)
  t.equal(RELAY_VERSION, 2)
  // The other way: what this version sends, read by a version-1 instance, means what it meant.
  for (const [id, fields] of [['7-0', PROGRESS], ['8-1', ['event', 'completed', 'jobId', 'j1']], ['9-2', ['event', 'cancelled', 'jobId', 'j1']]] as Array<[string, string[]]>) {
    const current = relayMessage(id, fields)
    const older = v1.relayMessage(id, fields)
    t.equal(current?.jobId, older?.jobId)
    t.same(v1.parseRelay(current?.payload ?? ''), v1.parseRelay(older?.payload ?? ''), `${fields[1]}: a v1 reader gets the same message`)
    t.equal(JSON.parse(current?.payload ?? '{}').v, RELAY_VERSION, 'and the message carries its version')
  }
  t.same(v1.parseRelay(resyncMessage('trim', 5)), { e: 'resync', t: 5, c: 'trim' }, 'resync, read by v1')
  t.same(parseRelay(resyncMessage('trim', 5)), { v: 2, e: 'resync', t: 5, c: 'trim' })
})

t.test('a version-1 bridge relays, this version\'s instance serves the socket: every step and the final message', async (t) => {
  const redis = await redisFor(t)
  // This version's instance, its own bridge off: every event reaches it from the older one.
  const app = await startApp(t, redis, { bridge: { enabled: false }, reconcileIntervalMs: 60_000 })
  // The older instance's bridge, as it ran: read the queue's event stream, publish v1 messages.
  const reader = new Redis(redis.url, { maxRetriesPerRequest: null })
  const publisher = new Redis(redis.url)
  const state = { running: true }
  let relayed = 0
  const stream = keys.queueKey('batch', 'events')
  const loop = (async () => {
    let last = '$'
    while (state.running) {
      const reply = await reader.xread('BLOCK', 200, 'STREAMS', stream, last).catch(() => null) as Array<[string, Array<[string, string[]]>]> | null
      for (const [, entries] of reply ?? []) {
        for (const [id, fields] of entries) {
          last = id
          const message = v1.relayMessage(id, fields)
          if (message === null) continue
          await publisher.publish(keys.channel('batch', message.jobId), message.payload)
          relayed++
        }
      }
    }
  })()
  t.teardown(async () => {
    state.running = false
    await loop
    reader.disconnect()
    publisher.disconnect()
  })
  const hold = gate()
  startWorker(t, redis, 'batch', app.uploadDir, { beforeItem: async (i) => { if (i === 0) await hold.promise } })
  const up = await upload(`${app.url}/batch/upload`, lines(6))
  const ws = connect(t, `${app.ws}/ws/batch/${up.body.job_id as string}`, { cookie: up.cookie })
  await ws.waitFor(m => m.status === 'processing')
  hold.open()
  const final = await ws.waitFor(m => m.status !== 'processing')
  t.same(final, { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 6, total: 6, eta_seconds: 0 })
  const steps = ws.messages.filter(m => m.processed > 0 && m.processed < 6).map(m => m.processed)
  t.ok(steps.length >= 3, `steps in between came through the v1 relay: ${steps.join(',')}`)
  t.ok(relayed >= 6, 'the older bridge relayed them')
})

t.test('this version\'s bridge relays, a version-1 subscriber reads every message', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const sub = new Redis(redis.url)
  t.teardown(() => sub.disconnect())
  const hold = gate()
  startWorker(t, redis, 'batch', app.uploadDir, { beforeItem: async (i) => { if (i === 0) await hold.promise } })
  const up = await upload(`${app.url}/batch/upload`, lines(5))
  const jobId: string = up.body.job_id
  const seen: v1.RelayMessageV1[] = []
  const done = gate()
  sub.on('message', (_channel: string, raw: string) => {
    const message = v1.parseRelay(raw)
    if (message === null) throw new Error(`a v1 reader cannot read ${raw}`)
    seen.push(message)
    if (message.e === 'completed') done.open()
  })
  await sub.subscribe(keys.channel('batch', jobId))
  hold.open()
  await done.promise
  const progress = seen.filter(m => m.e === 'progress').map(m => (m.d as { processed: number }).processed)
  t.same(progress, [1, 2, 3, 4, 5], 'every progress value, as v1 reads it')
  t.ok(seen.every(m => typeof m.i === 'string'), 'each with its stream entry id')
})
