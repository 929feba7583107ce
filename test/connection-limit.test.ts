import t from 'tap'
import { Redis } from 'ioredis'
import WebSocket from 'ws'
import pino from 'pino'
import { jobsProtocol } from '../lib/index'
import { ConnectionLimit } from '../lib/session/connection-limit'
import { Keys } from '../lib/core/keys'
import { connect, eventually, lines, redisFor, startApp, upload, type Client } from './helpers/index'
import { sse } from './helpers/sse'

const LIMIT = { code: 1008, reason: 'too many connections (2 per owner)' }

t.test('the per-owner connection limit holds across instances, frees on close, forgets a dead instance and counts a live new one', async (t) => {
  const redis = await redisFor(t)
  const opts = { maxConnectionsPerOwner: 2, instanceHeartbeatMs: 200, protocols: [jobsProtocol({ path: '/jobs-ws' })] }
  const a = await startApp(t, redis, opts)
  const b = await startApp(t, redis, { ...opts, uploadDir: a.uploadDir })
  const up = await upload(`${a.url}/batch/upload`, lines(1))
  const cookie = up.cookie as string
  const open = async (url: string): Promise<Client> => {
    const client = connect(t, `${url}/jobs-ws`, { cookie })
    // The first message is `connected`; a refused client gets only the close.
    await Promise.race([new Promise(resolve => client.socket.once('message', resolve)), client.closed])
    return client
  }

  const onA = await open(a.ws)
  await open(b.ws)
  t.same(await (await open(a.ws)).closed, LIMIT, 'a third on A, with one on each: refused')
  t.same(await (await open(b.ws)).closed, LIMIT, 'a third on B: refused')
  const stream = await sse(t, `${b.url}/batch/${up.body.job_id}/events`, { cookie })
  t.equal(stream.status, 429, 'SSE counts alike')
  const other = await upload(`${b.url}/batch/upload`, lines(1))
  const theirs = connect(t, `${b.ws}/jobs-ws`, { cookie: other.cookie })
  await theirs.waitFor(m => m.type === 'connected')
  t.pass('another owner still connects')

  onA.close()
  await eventually(() => a.app.jobProgress.stats().sockets === 0)
  const again = await open(b.ws)
  t.equal(again.messages[0]?.type, 'connected', 'a closed connection on A frees a place on B')

  // Counts left by an instance that died without closing (no heartbeat): not counted, and removed.
  const direct = new Redis(redis.url)
  t.teardown(async () => { await direct.quit() })
  const owner = `session:${decodeURIComponent(cookie.split('=')[1]).split('.')[0]}`
  const key = `jp:conn-ids:{${owner}}`
  // Each open connection is one id in the owner's hash, with the instance that holds it.
  const heldBy = async (instance: string): Promise<number> => Object.values(await direct.hgetall(key)).filter(i => i === instance).length
  t.equal(await heldBy(b.app.jobProgress.instanceId), 2)
  again.close()
  await eventually(async () => await heldBy(b.app.jobProgress.instanceId) === 1)
  for (let i = 0; i < 5; i++) await direct.hset(key, `dead-instance:${i}`, 'dead-instance')
  const past = await open(a.ws)
  // Confirmed across instances after `connected`: the dead ids go on the way, and it stays open.
  await eventually(async () => await heldBy('dead-instance') === 0)
  t.pass('a dead instance\'s ids are removed on the way')
  await eventually(async () => await heldBy(a.app.jobProgress.instanceId) === 1)
  t.equal(past.socket.readyState, WebSocket.OPEN, "a dead instance's connections do not count")
  past.close()
  await eventually(async () => await heldBy(a.app.jobProgress.instanceId) === 0)

  // An instance that started after A last read who is alive: its connections count at once.
  await direct.zadd('jp:instances', Date.now() + 60_000, 'new-instance')
  await direct.hset(key, 'new-instance:0', 'new-instance')
  t.same(await (await open(a.ws)).closed, LIMIT, "a new instance's connection counts")
  await direct.zrem('jp:instances', 'new-instance')
  await direct.hdel(key, 'new-instance:0')

  // A clean close gives back the instance's counts at once.
  await b.app.close()
  t.equal(await heldBy(b.app.jobProgress.instanceId), 0, "B's connections are gone with B")
  t.equal(await direct.zscore('jp:instances', b.app.jobProgress.instanceId), null, "and B's heartbeat")
  const c1 = await open(a.ws)
  const c2 = await open(a.ws)
  t.ok(c1.messages[0]?.type === 'connected' && c2.messages[0]?.type === 'connected', 'A has both places again')
})

t.test('Redis unreachable: the limit counts this instance only, and nobody is locked out', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { maxConnectionsPerOwner: 1, instanceHeartbeatMs: 200, protocols: [jobsProtocol({ path: '/jobs-ws' })] })
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  await redis.down()
  const client = connect(t, `${app.ws}/jobs-ws`, { cookie: up.cookie })
  t.equal((await client.waitFor(m => m.type === 'connected')).type, 'connected')
  const second = connect(t, `${app.ws}/jobs-ws`, { cookie: up.cookie })
  t.same(await second.closed, { code: 1008, reason: 'too many connections (1 per owner)' }, 'the local count still limits')
  // Back up before the app closes, so its close does not wait on reconnects.
  await redis.up()
})

t.test('a storm of connections of one owner takes its slots in one script call, by hash: the script text is sent once at most', async (t) => {
  const redis = await redisFor(t)
  const conn = new Redis(redis.url)
  const stats = new Redis(redis.url)
  const limit = new ConnectionLimit({ redis: conn, keys: new Keys({ prefix: 'bull', channelPrefix: 'jp' }), instanceId: 'one', max: 1000, heartbeatMs: 60_000, log: pino({ level: 'silent' }) })
  t.teardown(async () => { await limit.close(); await conn.quit(); await stats.quit() })
  await limit.start()
  const calls = async (): Promise<Record<string, number>> => {
    const out: Record<string, number> = {}
    for (const m of String(await stats.info('commandstats')).matchAll(/cmdstat_(eval|evalsha):calls=(\d+)/g)) out[m[1]] = Number(m[2])
    return out
  }
  const before = await calls()
  const taken = await Promise.all(Array.from({ length: 50 }, async () => await limit.acquire('storm')))
  t.ok(taken.every(id => id !== null), '50 slots taken')
  const took = await calls()
  for (const id of taken) limit.release('storm', id as string)
  await eventually(async () => (await conn.hlen('jp:conn-ids:{storm}')) === 0)
  const after = await calls()
  const scripts = (a: Record<string, number>, b: Record<string, number>): number => (a.eval ?? 0) + (a.evalsha ?? 0) - (b.eval ?? 0) - (b.evalsha ?? 0)
  // The take's and the give-back's texts, once each at most; every other call by hash.
  t.ok((after.eval ?? 0) - (before.eval ?? 0) <= 2, `EVAL with the script text: ${(after.eval ?? 0) - (before.eval ?? 0)} (at most once per script)`)
  // Taken in one turn by one owner: one call for all of them, not one per connection.
  t.ok(scripts(took, before) <= 2, `${scripts(took, before)} script calls to take 50 connections`)
  t.equal(await conn.exists('jp:conn-n:{storm}'), 0, 'given back: no count left')
})

t.test('a take reads one count per instance, not every id of the owner; ids an older version wrote without counts are counted once from the ids', async (t) => {
  const redis = await redisFor(t)
  const conn = new Redis(redis.url)
  const watcher = new Redis(redis.url)
  const monitor = await watcher.monitor()
  const limit = new ConnectionLimit({ redis: conn, keys: new Keys({ prefix: 'bull', channelPrefix: 'jp' }), instanceId: 'one', max: 3, heartbeatMs: 60_000, log: pino({ level: 'silent' }) })
  t.teardown(async () => { await limit.close(); await conn.quit(); monitor.disconnect(); watcher.disconnect() })
  await limit.start()
  // An older version's ids (no counts beside them), held by an instance that is alive.
  await conn.zadd('jp:instances', String(Date.now()), 'older')
  await conn.hset('jp:conn-ids:{svc}', 'older:0', 'older', 'older:1', 'older', 'older:2', 'older')
  const reads: string[] = []
  let marks = 0
  monitor.on('monitor', (_time: string, args: string[]) => {
    if (args[0].toLowerCase() === 'hgetall') reads.push(args[1])
    if (args[0].toLowerCase() === 'echo') marks++
  })
  // What the monitor saw up to now (it reports in order, a little later).
  const seen = async (): Promise<void> => {
    const want = marks + 1
    await conn.echo('mark')
    await eventually(async () => marks >= want)
  }
  const first = await limit.acquire('svc')
  t.equal(first, null, 'three held by the older instance: the fourth is refused (counted from the ids)')
  t.same(await conn.hgetall('jp:conn-n:{svc}'), { older: '3' }, 'the counts were made from the ids')
  await conn.hdel('jp:conn-ids:{svc}', 'older:0')
  await conn.hincrby('jp:conn-n:{svc}', 'older', -1)
  await seen()
  reads.length = 0
  const second = await limit.acquire('svc')
  await seen()
  t.type(second, 'string', 'one given back: taken')
  t.same(reads, ['jp:conn-n:{svc}'], 'the take read the counts, not the ids')
  t.same(await conn.hgetall('jp:conn-n:{svc}'), { older: '2', one: '1' })
  limit.release('svc', second as string)
  await eventually(async () => await conn.hexists('jp:conn-n:{svc}', 'one') === 0)
  t.equal(await conn.hlen('jp:conn-ids:{svc}'), 2, 'given back: its id gone, the count of its instance with it')
})
