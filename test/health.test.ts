import t from 'tap'
import Fastify from 'fastify'
import { jobProgress } from '../lib/index'
import { eventually, redisFor, startApp, tempDir } from './helpers/index'

async function get (url: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url)
  return { status: res.status, body: await res.json() }
}

t.test('/health is live and /ready ready with Redis up and the bridge running', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const live = await get(`${app.url}/job-progress/health`)
  t.equal(live.status, 200)
  t.match(live.body, { status: 'ok', instance: app.app.jobProgress.instanceId, redis: 'up', sockets: 0 })
  const ready = await get(`${app.url}/job-progress/ready`)
  t.equal(ready.status, 200)
  t.same(ready.body, { status: 'ready', instance: app.app.jobProgress.instanceId, redis: 'up', bridge: 'running' })
})

t.test('Redis down: /ready is 503 naming what is missing, /health stays 200; both recover', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  await redis.down()
  t.ok(await eventually(async () => (await get(`${app.url}/job-progress/ready`)).status === 503), '/ready turns 503')
  const ready = await get(`${app.url}/job-progress/ready`)
  t.match(ready.body, { status: 'not ready', reason: /Redis is not reachable/, redis: 'down' })
  const live = await get(`${app.url}/job-progress/health`)
  t.equal(live.status, 200, 'liveness does not depend on Redis')
  t.equal(live.body.redis, 'down')
  await redis.up()
  t.ok(await eventually(async () => (await get(`${app.url}/job-progress/ready`)).status === 200, 15_000), '/ready is 200 again once Redis is back')
})

t.test('bridge disabled: /ready reports it as such and is ready; health: false adds no routes', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { bridge: { enabled: false }, health: { livePath: '/livez', readyPath: '/readyz' } })
  const ready = await get(`${app.url}/readyz`)
  t.equal(ready.status, 200)
  t.equal(ready.body.bridge, 'disabled')
  t.equal((await get(`${app.url}/livez`)).status, 200, 'custom paths')

  const bare = Fastify()
  t.teardown(async () => await bare.close())
  await bare.register(jobProgress, { connection: redis.url, kinds: { batch: {} }, uploadDir: await tempDir(t), health: false })
  t.equal((await bare.inject('/job-progress/health')).statusCode, 404)
  t.equal((await bare.inject('/job-progress/ready')).statusCode, 404)
})
