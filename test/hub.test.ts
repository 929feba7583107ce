import t from 'tap'
import { Queue } from 'bullmq'
import { randomUUID } from 'node:crypto'
import type { JobEvent } from '../lib/core/event'
import { RedisBroker } from '../lib/broker/classic'
import { Hub } from '../lib/hub/hub'
import { Keys } from '../lib/core/keys'
import { writeOwner } from '../lib/core/snapshot'
import { parseVersion } from '../lib/wire/version'
import { redisFor } from './helpers/index'
import type { RedisServer } from './helpers/redis'

const log = { debug () {}, info () {}, warn () {}, error () {} } as any
const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })

async function setup (t: { teardown: (fn: () => unknown) => void }, redis: RedisServer, extra: Partial<ConstructorParameters<typeof Hub>[0]> = {}) {
  const cmd = redis.client()
  const subscriber = redis.client()
  const queue = new Queue('hubq', { connection: { host: '127.0.0.1', port: redis.port } })
  const hub = new Hub({ redis: cmd, subscriber, keys, throttleMs: 0, sweepReadsPerSecond: 0, log, ...extra })
  t.teardown(async () => {
    hub.close()
    await queue.close()
    cmd.disconnect()
    subscriber.disconnect()
  })
  const add = async (owner: string): Promise<string> => {
    const jobId = randomUUID()
    await queue.add('j', { owner }, { jobId })
    await writeOwner(cmd, keys, 'hubq', jobId, owner)
    return jobId
  }
  return { hub, cmd, queue, add, target: (jobId: string) => ({ kind: 'k', queue: 'hubq', jobId }) }
}

async function calls (redis: RedisServer): Promise<Record<string, number>> {
  const client = redis.client()
  try {
    const out: Record<string, number> = {}
    for (const m of (await client.info('commandstats')).matchAll(/cmdstat_([\w|]+):calls=(\d+)/g)) out[m[1]] = Number(m[2])
    return out
  } finally {
    client.disconnect()
  }
}

const diff = (a: Record<string, number>, b: Record<string, number>): Record<string, number> => {
  const out: Record<string, number> = {}
  // The counting connection's own handshake is not the hub's.
  for (const k of Object.keys(b)) if (b[k] !== (a[k] ?? 0) && !['info', 'hello', 'client|setinfo', 'client|setname', 'select'].includes(k)) out[k] = b[k] - (a[k] ?? 0)
  return out
}

t.test('open(target, owner): the owner is checked first, in the snapshot script; someone else\'s job costs what an unknown id costs', async (t) => {
  const redis = await redisFor(t)
  const { hub, add, target } = await setup(t, redis)
  const jobId = await add('alice')
  t.equal(await hub.open(target(randomUUID()), 'warm-up'), null, 'the script is loaded once')
  const settled = async (before: Record<string, number>): Promise<Record<string, number>> => {
    // The refused channel's UNSUBSCRIBE is sent, not awaited: counted once Redis has it.
    for (let i = 0; i < 50; i++) {
      const used = diff(before, await calls(redis))
      if (used.unsubscribe !== undefined) return used
      await new Promise(resolve => setTimeout(resolve, 20))
    }
    return diff(before, await calls(redis))
  }

  let before = await calls(redis)
  t.equal(await hub.open(target(jobId), 'mallory'), null, 'someone else\'s job: null')
  const foreign = await settled(before)
  before = await calls(redis)
  t.equal(await hub.open(target(randomUUID()), 'mallory'), null, 'unknown id: null')
  const unknown = await settled(before)
  t.same(foreign, unknown, 'the same Redis commands for both')
  t.same(foreign, { subscribe: 1, evalsha: 1, hmget: 1, get: 1, unsubscribe: 1 }, 'SUBSCRIBE, then one script that stops after the owner\'s two O(1) lookups, then UNSUBSCRIBE: no snapshot read')
  t.equal(hub.watchedCount, 0, 'nothing watched')

  const opened = await hub.open(target(jobId), 'alice')
  t.equal(opened?.snapshot.owner, 'alice', 'the owner opens it')
  const sink = { deliver () {} }
  opened?.attach(sink)
  // Watched here by its owner: somebody else is refused after the same commands, and the
  // owner's subscription stays.
  before = await calls(redis)
  t.equal(await hub.open(target(jobId), 'mallory'), null, 'someone else\'s job watched here: null')
  t.same(diff(before, await calls(redis)), { subscribe: 1, evalsha: 1, hmget: 1, get: 1 }, 'the same SUBSCRIBE and owner lookups as an unknown id (its UNSUBSCRIBE aside: the channel is still watched)')
  t.equal(hub.watchedCount, 1, 'the owner\'s watch is kept')
  const client = redis.client()
  t.same(await client.call('PUBSUB', 'NUMSUB', keys.channel('hubq', jobId)), [keys.channel('hubq', jobId), 1], 'still subscribed')
  client.disconnect()
  t.equal(await hub.open(target(jobId), null), null, 'an expected owner of null is nobody')
  const legacy = await hub.open(target(jobId))
  t.equal(legacy?.snapshot.owner, 'alice', 'without an owner the caller checks the snapshot, as before')
  legacy?.detach(sink)
  opened?.detach(sink)
  t.equal(hub.watchedCount, 0)
})

t.test('open(target, owner): jobs added without the owner field are checked on data.owner', async (t) => {
  const redis = await redisFor(t)
  const { hub, queue, target } = await setup(t, redis)
  const jobId = randomUUID()
  await queue.add('j', { owner: 'alice' }, { jobId })
  t.equal(await hub.open(target(jobId), 'mallory'), null, 'someone else: null')
  const opened = await hub.open(target(jobId), 'alice')
  t.equal(opened?.snapshot.event.state, 'queued', 'the owner named in data opens it')
  opened?.detach({ deliver () {} })
  t.equal(hub.watchedCount, 0)
})

t.test('ordered by version, not arrival: a relayed event older than the snapshot is dropped; every event has a version', async (t) => {
  const redis = await redisFor(t)
  const { hub, cmd, queue, add, target } = await setup(t, redis)
  const jobId = await add('alice')
  const channel = keys.channel('hubq', jobId)
  const stream = keys.queueKey('hubq', 'events')
  const before = (await cmd.xrevrange(stream, '+', '-', 'COUNT', 1))[0][0]
  const opened = await hub.open(target(jobId), 'alice')
  if (opened === null) throw new Error('not opened')
  const seen: JobEvent[] = []
  opened.attach({ deliver: (e) => seen.push(e) })
  t.ok(seen[0].version !== undefined, 'the snapshot carries a version')
  t.equal(parseVersion(seen[0].version)?.attempt, 1)

  // A message delayed in flight: its entry is older than what the snapshot read.
  hub.relay(channel, JSON.stringify({ e: 'progress', t: Date.now(), i: before, d: { processed: 5, total: 9 } }))
  t.equal(seen.length, 1, 'the stale message is dropped, although its count is higher')

  // Newer entries apply, each with its own version.
  const [ms] = before.split('-')
  hub.relay(channel, JSON.stringify({ e: 'progress', t: Date.now(), i: `${Number(ms) + 10}-0`, d: { processed: 2, total: 9 } }))
  hub.relay(channel, JSON.stringify({ e: 'progress', t: Date.now(), i: `${Number(ms) + 5}-0`, d: { processed: 7, total: 9 } }))
  t.equal(seen.length, 2, 'a newer entry applies; one between it and the snapshot arrives late and is dropped')
  t.equal(seen[1].processed, 2)
  t.equal(seen[1].version, `1.${Number(ms) + 10}-0`)
  hub.relay(channel, 'not json')
  hub.relay(channel, JSON.stringify({ nothing: true }))
  t.equal(seen.length, 2, 'malformed messages are dropped')

  // The job is removed behind the hub's back: the `removed` event reports it cancelled.
  await queue.remove(jobId)
  hub.relay(channel, JSON.stringify({ e: 'removed', t: Date.now(), i: `${Number(ms) + 20}-0` }))
  await new Promise<void>(resolve => { const check = (): void => { if (seen.length > 2) resolve(); else setTimeout(check, 10) }; check() })
  t.match(seen[2], { state: 'cancelled', error: 'job was removed' })
  opened.detach({ deliver () {} })
})

t.test('a storm: 500 opens in one turn share one SUBSCRIBE and one pipelined read, one script per hundred jobs', async (t) => {
  const redis = await redisFor(t)
  const { hub, add, target } = await setup(t, redis)
  const ids: string[] = []
  for (let i = 0; i < 500; i++) ids.push(await add('alice'))
  const before = await calls(redis)
  const opened = await Promise.all(ids.map(async id => await hub.open(target(id))))
  const used = diff(before, await calls(redis))
  t.ok(opened.every(o => o !== null), 'every job opened')
  t.equal(used.subscribe, 1, 'one SUBSCRIBE for 500 channels')
  t.equal((used.evalsha ?? 0) + (used.eval ?? 0), 5, 'one script call per hundred jobs, in one pipeline')
  t.equal(used.get, 500, 'each job read once (one GET of its cancellation mark each)')
  t.equal(hub.watchedCount, 500)
  for (const o of opened) o?.detach({ deliver () {} })
})

t.test('200 opens of one job in one turn (tabs on a finished job) read it once, and keep no copy of its result each', async (t) => {
  const redis = await redisFor(t)
  const { hub, add, target } = await setup(t, redis)
  const jobId = await add('alice')
  const cmd = redis.client()
  t.teardown(() => cmd.disconnect())
  // Finished, with a 200 KB result.
  await cmd.hset(`bull:hubq:${jobId}`, 'returnvalue', JSON.stringify('x'.repeat(200_000)), 'finishedOn', String(Date.now()))
  await cmd.zadd('bull:hubq:completed', Date.now(), jobId)
  await cmd.lrem('bull:hubq:wait', 0, jobId)
  const output = async (): Promise<number> => Number(/total_net_output_bytes:(\d+)/.exec(await cmd.info('stats'))?.[1])
  const before = await calls(redis)
  const bytes = await output()
  const opened = await Promise.all(Array.from({ length: 200 }, async () => await hub.open(target(jobId), 'alice')))
  const sent = await output() - bytes
  const used = diff(before, await calls(redis))
  t.ok(opened.every(o => o?.snapshot.event.state === 'completed'), 'every opener has the final state')
  t.equal((used.evalsha ?? 0) + (used.eval ?? 0), 1, 'one script call')
  t.ok(sent < 400_000, `Redis sent ${sent} bytes: the result once, not 200 times`)
  t.equal(opened[0]?.snapshot.event, opened[199]?.snapshot.event, 'one state, shared')
  for (const o of opened) o?.detach({ deliver () {} })
})

t.test('reconcile() re-reads on demand; the deprecated sweepReadsPerSecond still caps the sweep', async (t) => {
  const redis = await redisFor(t)
  // A period of 2 s would read all 20 jobs in ~2 s; the cap keeps it to 2 a second.
  const { hub, cmd, add, target } = await setup(t, redis, { sweepPeriodMs: 2_000, sweepReadsPerSecond: 2 })
  const ids: string[] = []
  for (let i = 0; i < 20; i++) ids.push(await add('alice'))
  const opened = await Promise.all(ids.map(async id => await hub.open(target(id))))
  const sink = { deliver () {} }
  for (const o of opened) o?.attach(sink)
  const before = await calls(redis)
  await new Promise(resolve => setTimeout(resolve, 2_100))
  // Jobs read, not script calls (a call reads many): one GET of the cancellation mark each.
  const swept = diff(before, await calls(redis)).get ?? 0
  t.ok(swept >= 2 && swept <= 6, `the sweep read ${swept} jobs in ~2 s (capped at 2/s), not 20`)
  const b2 = await calls(redis)
  await hub.reconcile()
  const forced = diff(b2, await calls(redis))
  t.equal(forced.get, 20, 'a forced reconcile re-reads each unfinished job once')
  t.equal(forced.evalsha, 1, 'in one script call')
  // A job found gone on a re-read after a fault was lost with Redis: failed, job_lost.
  const seen: JobEvent[] = []
  const again = await hub.open(target(ids[0]))
  again?.attach({ deliver: (e) => seen.push(e) })
  await cmd.del(keys.job('hubq', ids[0]))
  await hub.reconcile()
  t.match(seen.at(-1), { state: 'failed', error: 'job_lost' })
  for (const o of opened) o?.detach(sink)
  again?.detach(sink)
})

t.test('classic broker: a reconnect is signalled even when the first connect came before anybody listened', async (t) => {
  const redis = await redisFor(t)
  const commands = redis.client()
  const subscriber = redis.client()
  t.teardown(() => { commands.disconnect(); subscriber.disconnect() })
  const broker = new RedisBroker(commands, subscriber)
  // The plugin registers its hub only after awaiting its command connection: by then the
  // subscriber may well be connected already.
  await new Promise(resolve => subscriber.status === 'ready' ? resolve(null) : subscriber.once('ready', resolve))
  await broker.subscribe(['jp:test:{1}'])
  const recovered = new Promise<void>(resolve => broker.onRecover(resolve))
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  const list = await admin.client('LIST') as string
  const id = list.split('\n').filter(l => /\bsub=[1-9]/.test(l)).map(l => /\bid=(\d+)/.exec(l)?.[1] as string)[0]
  await admin.call('CLIENT', 'KILL', 'ID', id)
  await recovered
  t.pass('recover called after the reconnect')
})
