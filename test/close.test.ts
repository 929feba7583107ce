import t from 'tap'
import Fastify from 'fastify'
import { jobProgress } from '../lib/index'
import { connect, lines, redisFor, startApp, tempDir, upload } from './helpers/index'

/** Names of the connections Redis has open, besides the one asking. */
async function clients (probe: import('ioredis').Redis): Promise<string[]> {
  const list = await probe.client('LIST') as string
  return list.trim().split('\n').filter(line => !line.includes('cmd=client|list'))
}

t.test('app.close(): sockets close with 1001, the bridge leaves the group, every connection it opened is closed', async (t) => {
  const redis = await redisFor(t)
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  const { app, url } = await startApp(t, redis)
  const up = await upload(`${url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  t.ok((await clients(probe)).length >= 3, 'commands, subscriber and bridge connections are open')
  const consumers = async (): Promise<string[]> => (await probe.xinfo('CONSUMERS', 'bull:batch:events', 'jp-bridge') as string[][]).map(row => String(row[row.indexOf('name') + 1]))
  // The consumer exists from the bridge's first blocking read on.
  for (let i = 0; i < 100 && !(await consumers()).includes(app.jobProgress.instanceId); i++) await new Promise(resolve => setTimeout(resolve, 50))
  t.ok((await consumers()).includes(app.jobProgress.instanceId), 'the bridge reads as this instance')

  await app.close()
  const closed = await client.closed
  t.same(closed, { code: 1001, reason: 'server shutting down' }, 'clients are told to reconnect elsewhere')
  t.same(await clients(probe), [], 'no connection of the plugin is left open')
  t.notOk((await consumers()).includes(app.jobProgress.instanceId), 'the bridge left the consumer group')
})

t.test('a Redis client passed in is used and left open; the plugin closes only its own', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const mine = redis.client()
  t.teardown(() => mine.disconnect())
  const app = Fastify()
  await app.register(jobProgress, { connection: mine, kinds: { batch: {} }, uploadDir, session: { secret: 'a-test-secret-of-enough-length' } })
  await app.ready()
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  const before = (await clients(probe)).length
  t.ok(before >= 4, 'the caller\'s client plus the plugin\'s command, subscriber and bridge connections')
  await app.close()
  t.equal(mine.status, 'ready', 'the caller\'s client is still open')
  t.equal(await mine.ping(), 'PONG')
  t.equal((await clients(probe)).length, 1, 'only the caller\'s client remains')
})
