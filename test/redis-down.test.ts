import t from 'tap'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

t.test('while Redis is down: sockets close with 1013, status answers 503, nothing hangs; then it recovers', async (t) => {
  const redis = await redisFor(t)
  const { app, url, uploadDir } = await startApp(t, redis)
  const up = await upload(`${url}/batch/upload`, lines(3))
  t.equal(up.status, 202)

  await redis.down()
  t.teardown(async () => await redis.up().catch(() => {}))
  // The plugin's connections notice the loss (a refused reconnect), not only a later command.
  while (app.jobProgress.redisReady()) await new Promise(resolve => setTimeout(resolve, 20))

  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  t.same(await client.closed, { code: 1013, reason: 'temporarily unavailable, try again' }, 'the socket is refused at once, not left waiting')
  t.same(client.messages, [])
  const status = await fetch(`${url}${up.body.status_url}`, { headers: { cookie: up.cookie as string } })
  t.equal(status.status, 503)
  t.match(await status.json(), { code: 'FST_JP_QUEUE_UNAVAILABLE', message: /Redis unreachable/ })

  await redis.up()
  while (!app.jobProgress.redisReady()) await new Promise(resolve => setTimeout(resolve, 20))
  startWorker(t, redis, 'batch', uploadDir)
  const again = connect(t, up.body.ws_url, { cookie: up.cookie })
  t.match(await again.waitFor(m => m.status === 'complete'), { processed: 3, total: 3 }, 'once Redis is back the job is served to the end')
  t.equal((await again.closed).code, 1000)
})
