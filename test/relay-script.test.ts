import t from 'tap'
import { spawnSync } from 'node:child_process'
import Fastify from 'fastify'
import { Bridge, relayMessage, type BridgeOptions } from '../lib/bridge/bridge'
import { RELAY_SCRIPT } from '../lib/bridge/relay-script'
import { Keys } from '../lib/core/keys'
import { eventually, redisFor } from './helpers/index'
import type { RedisServer } from './helpers/index'

const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
const stream = keys.queueKey('batch', 'events')

/** Every message published on the queue's channels, in the order the subscriber got them. */
async function listen (t: { teardown: (fn: () => unknown) => void }, redis: RedisServer): Promise<Array<[string, string]>> {
  const sub = redis.client()
  t.teardown(() => sub.disconnect())
  const got: Array<[string, string]> = []
  sub.on('pmessage', (_p: string, channel: string, message: string) => got.push([channel, message]))
  await sub.psubscribe('jp:batch:*')
  return got
}

/** A bridge on its own two connections, closed at teardown (again, if the test closed it). */
function bridgeOn (t: { teardown: (fn: () => unknown) => void }, redis: RedisServer, opts: Partial<BridgeOptions>): Bridge {
  const cmd = redis.client()
  const blocking = redis.client()
  const bridge = new Bridge({ redis: cmd, blocking, keys, queues: ['batch'], group: 'jp-bridge', consumer: 'me', blockMs: 60_000, claimIdleMs: 10_000, claimIntervalMs: 10_000, consumerIdleMs: 60_000, log: Fastify().log, ...opts })
  t.teardown(async () => { await bridge.close(); cmd.disconnect(); blocking.disconnect() })
  return bridge
}

t.test('the script publishes what relayMessage builds, acknowledges progress and hands back lifecycle events', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  await r.xgroup('CREATE', stream, 'g', '$', 'MKSTREAM')
  await r.xgroup('CREATE', stream, 'g:wake', '$', 'MKSTREAM')
  const got = await listen(t, redis)
  const rows: string[][] = [
    ['event', 'progress', 'jobId', 'j1', 'data', '{"processed":3,"total":9,"stage":"a \\"quoted\\" stage","ünï":"ç"}'],
    ['event', 'progress', 'jobId', 'j-2:x', 'data', '42'],
    ['event', 'active', 'jobId', 'j1', 'prev', 'waiting'],
    ['event', 'added', 'jobId', 'j1', 'name', 'batch'],
    ['event', 'drained', 'id', '5'],
    ['jobId', 'j1', 'event', 'completed', 'returnvalue', '{"big":"x"}'],
    ['event', 'failed', 'jobId', 'j3', 'failedReason', 'boom'],
    ['event', 'cancelled', 'jobId', 'j4'],
    ['event', 'waiting', 'jobId', 'j5', 'prev', 'failed'],
    ['event', 'delayed', 'jobId', 'j5', 'delay', '100'],
    ['event', 'stalled', 'jobId', 'j6'],
    ['event', 'removed', 'jobId', 'j7', 'prev', 'waiting'],
    ['event', 'progress', 'jobId', '', 'data', '1']
  ]
  const ids: string[] = []
  for (const row of rows) ids.push(await r.xadd(stream, '*', ...row) as string)
  const [read, published, back] = await r.eval(RELAY_SCRIPT, 1, stream, 'g', 'me', 500, 'g:wake', 'jp:batch:{', '}', '0') as [number, number, Array<[string, string[]]>]
  const expected = rows.map((row, i) => relayMessage(ids[i], row)).filter(m => m !== null).map(m => [keys.channel('batch', m.jobId), m.payload])
  t.equal(read, rows.length, 'every entry read')
  t.equal(published, expected.length)
  while (got.length < expected.length) await new Promise(resolve => setTimeout(resolve, 10))
  t.same(got, expected, 'the same channels and payloads as relayMessage, in stream order')
  const lifecycle = rows.map((row, i) => [ids[i], row] as const).filter(([id, row]) => relayMessage(id, row) !== null && !row.includes('progress'))
  t.same(back.map(([id]) => id), lifecycle.map(([id]) => id), 'lifecycle entries handed back for the listeners')
  const pending = await r.xpending(stream, 'g', '-', '+', 100) as Array<[string]>
  t.same(pending.map(([id]) => id), lifecycle.map(([id]) => id), 'only those stay pending; progress and skipped entries are acknowledged')

  // With progress listeners, progress comes back too.
  const more = await r.xadd(stream, '*', 'event', 'progress', 'jobId', 'j1', 'data', '5') as string
  const again = await r.eval(RELAY_SCRIPT, 1, stream, 'g', 'me', 500, 'g:wake', 'jp:batch:{', '}', '1') as [number, number, Array<[string, string[]]>]
  t.same(again[2].map(([id]) => id), [more])
})

t.test('two ordered bridges under load: every message of a job arrives, in stream order', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const got = await listen(t, redis)
  const bridges = ['a', 'b'].map(consumer => bridgeOn(t, redis, { consumer, blockMs: 100 }))
  for (const bridge of bridges) await bridge.start()
  // Bursts of every size, spread over 4 jobs: both bridges read at the same time.
  const total = 6_000
  let sent = 0
  while (sent < total) {
    const pipe = r.pipeline()
    const n = Math.min(total - sent, 1 + (sent % 97))
    for (let i = 0; i < n; i++, sent++) pipe.xadd(stream, '*', 'event', 'progress', 'jobId', `j${sent % 4}`, 'data', String(sent))
    await pipe.exec()
  }
  while (got.length < total && bridges.reduce((n, b) => n + b.published, 0) < total) await new Promise(resolve => setTimeout(resolve, 20))
  while (got.length < total) await new Promise(resolve => setTimeout(resolve, 20))
  t.equal(got.length, total, 'one message per entry')
  t.ok(bridges.every(b => b.published > 0), `both bridges relayed (${bridges.map(b => b.published).join(' + ')})`)
  const last = new Map<string, number>()
  let backwards = 0
  for (const [channel, message] of got) {
    const n = Number((JSON.parse(message) as { d: number }).d)
    if ((last.get(channel) ?? -1) > n) backwards++
    last.set(channel, n)
  }
  t.equal(backwards, 0, 'no job\'s message arrives after a newer one of the same job')
  const [pending] = await r.xpending(stream, 'jp-bridge') as [number]
  t.equal(pending, 0, 'every progress entry acknowledged by the script')
})

t.test('an idle stream wakes one bridge per event, and a burst larger than one read is read at once', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const got = await listen(t, redis)
  const bridges = ['a', 'b', 'c'].map(consumer => bridgeOn(t, redis, { consumer }))
  for (const bridge of bridges) await bridge.start()
  const calls = async (): Promise<number> => Number(/cmdstat_evalsha:calls=(\d+)/.exec(await r.info('commandstats'))?.[1] ?? 0)
  // Let the first scripts of each bridge (at start) run.
  await new Promise(resolve => setTimeout(resolve, 200))
  const before = await calls()
  for (let i = 0; i < 20; i++) {
    await r.xadd(stream, '*', 'event', 'progress', 'jobId', 'j1', 'data', String(i))
    while (got.length < i + 1) await new Promise(resolve => setTimeout(resolve, 5))
  }
  const scripts = await calls() - before
  t.ok(scripts <= 22, `20 events one at a time ran the script ${scripts} times, not once per bridge each`)
  // 1,200 entries in one write: more than one read (500) takes; the rest is read without waiting
  // for another entry (blockMs is a minute here).
  const pipe = r.pipeline()
  for (let i = 0; i < 1_200; i++) pipe.xadd(stream, '*', 'event', 'progress', 'jobId', `j${i % 3}`, 'data', String(i))
  await pipe.exec()
  while (got.length < 1_220) await new Promise(resolve => setTimeout(resolve, 10))
  t.equal(got.length, 1_220)
})

t.test('an entry is published the moment it arrives, without waiting for the bridge\'s process', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const got = await listen(t, redis)
  const bridge = bridgeOn(t, redis, {})
  await bridge.start()
  // Blocked on its wake-up, with the relay script waiting behind it in Redis.
  t.ok(await eventually(async () => / flags=b .* cmd=xreadgroup /.test(await r.client('LIST') as string)), 'the bridge waits on its wake-up')
  const published = async (): Promise<number> => Number(/cmdstat_publish:calls=(\d+)/.exec(await r.info('commandstats'))?.[1] ?? 0)
  const before = await published()
  // Another process adds the entry and reads Redis's count of PUBLISH while this one cannot run:
  // spawnSync holds its event loop, so nothing the bridge would send after the wake-up's reply
  // reaches Redis before the count is read.
  const child = spawnSync(process.execPath, ['-e', `
    const Redis = require('ioredis')
    const r = new Redis(${redis.port})
    r.xadd('${stream}', '*', 'event', 'progress', 'jobId', 'j1', 'data', '7')
      .then(() => r.info('commandstats'))
      .then(info => { process.stdout.write(/cmdstat_publish:calls=(\\d+)/.exec(info)?.[1] ?? '0'); r.disconnect() })
  `], { encoding: 'utf8', timeout: 20_000 })
  t.equal(child.status, 0, child.stderr)
  t.equal(Number(child.stdout) - before, 1, 'published while the bridge\'s process was held')
  t.ok(await eventually(() => got.length === 1), 'and received')
  t.match(got[0], ['jp:batch:{j1}', /"e":"progress".*"d":7/])
})

t.test('an entry no bridge was woken for is read by the periodic check of the group\'s lag', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const got = await listen(t, redis)
  // The wake-up waits a minute: only the check every 200 ms can find the entry.
  const bridge = bridgeOn(t, redis, { claimIntervalMs: 200 })
  await bridge.start()
  await new Promise(resolve => setTimeout(resolve, 100))
  // As if a bridge took the wake-up and died before reading: the wake group moves past the entry
  // in the same transaction that adds it, so the blocked wake-up never returns.
  await r.multi().xadd(stream, '*', 'event', 'completed', 'jobId', 'j1').xgroup('SETID', stream, 'jp-bridge:wake', '$').exec()
  while (got.length < 1) await new Promise(resolve => setTimeout(resolve, 20))
  t.match(got[0], ['jp:batch:{j1}', /"e":"completed"/])
})

t.test('wake consumers of dead instances leave the wake group, and a closing bridge takes its own out', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  await r.xgroup('CREATE', stream, 'jp-bridge:wake', '$', 'MKSTREAM')
  await r.xgroup('CREATECONSUMER', stream, 'jp-bridge:wake', 'dead-instance')
  const names = async (): Promise<string[]> => {
    const rows = await r.xinfo('CONSUMERS', stream, 'jp-bridge:wake') as Array<Array<string | number>>
    return rows.map(row => String(row[row.indexOf('name') + 1]))
  }
  t.same(await names(), ['dead-instance'])
  const bridge = bridgeOn(t, redis, { blockMs: 100, claimIntervalMs: 100, consumerIdleMs: 300 })
  await bridge.start()
  while ((await names()).includes('dead-instance')) await new Promise(resolve => setTimeout(resolve, 50))
  // The live bridge's wake consumer exists once a wake-up handed it an entry.
  await r.xadd(stream, '*', 'event', 'progress', 'jobId', 'j1', 'data', '1')
  while (!(await names()).includes('me')) await new Promise(resolve => setTimeout(resolve, 50))
  await bridge.close()
  t.same(await names(), [], 'closed: its wake consumer is gone too')
})

t.test('a lifecycle entry reaches the listeners as soon as the script ran, not when the next wake-up returns', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  let seen!: (event: string) => void
  const listened = new Promise<string>(resolve => { seen = resolve })
  // The wake-up after the script blocks for a minute: the listener must not wait for it.
  const bridge = bridgeOn(t, redis, { claimIdleMs: 120_000, claimIntervalMs: 60_000, onEvent: (event) => { if (event.final) seen(event.event) } })
  await bridge.start()
  await r.xadd(stream, '*', 'event', 'completed', 'jobId', 'j1')
  t.equal(await listened, 'completed')
  for (;;) {
    const [count] = await r.xpending(stream, 'jp-bridge') as [number]
    if (count === 0) break
    await new Promise(resolve => setTimeout(resolve, 20))
  }
  t.pass('acknowledged once the listener returned')
})

t.test('close() reads what arrived after the last wake-up and hands it to the listeners before it returns', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const seen: string[] = []
  const bridge = bridgeOn(t, redis, { claimIdleMs: 120_000, claimIntervalMs: 60_000, onEvent: (event) => { seen.push(event.event) } })
  await bridge.start()
  await new Promise(resolve => setTimeout(resolve, 100))
  // As if the wake-up was taken just before close(): nothing wakes this bridge for the entry.
  await r.multi().xadd(stream, '*', 'event', 'completed', 'jobId', 'j1').xgroup('SETID', stream, 'jp-bridge:wake', '$').exec()
  await bridge.close()
  t.same(seen, ['completed'])
  const [count] = await r.xpending(stream, 'jp-bridge') as [number]
  t.equal(count, 0, 'nothing left pending for another instance')
})
