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
  for (const id of taken) limit.release('storm', id as string)
  await eventually(async () => (await conn.hlen('jp:conn-ids:{storm}')) === 0)
  const after = await calls()
  t.ok((after.eval ?? 0) - (before.eval ?? 0) <= 1, `EVAL with the script text: ${(after.eval ?? 0) - (before.eval ?? 0)} (at most once)`)
  // Taken in one turn by one owner: one call for all of them, not one per connection.
  t.ok((after.eval ?? 0) + (after.evalsha ?? 0) - (before.eval ?? 0) - (before.evalsha ?? 0) <= 2, `${(after.eval ?? 0) + (after.evalsha ?? 0) - (before.eval ?? 0) - (before.evalsha ?? 0)} script calls for 50 connections`)
})
