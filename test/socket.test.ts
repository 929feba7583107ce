import t from 'tap'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

t.test('upload → job → progress on /ws/:kind/:jobId → final message → close 1000', async (t) => {
  const redis = await redisFor(t)
  const { url, ws, uploadDir } = await startApp(t, redis)
  const up = await upload(`${url}/batch/upload`, lines(5))
  t.equal(up.status, 202)
  t.match(up.body, { job_id: /^[0-9a-f-]{36}$/, status_url: `/batch/${up.body.job_id}/status`, ws_url: `${ws}/ws/batch/${up.body.job_id}` })
  t.match(up.cookie, /^jp_session=/)

  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  const first = await client.waitFor(() => true)
  t.same(Object.keys(first).sort(), ['eta_seconds', 'job_id', 'processed', 'progress', 'status', 'total'], 'exactly the seed fields')
  t.equal(first.status, 'processing', 'a queued job reports processing')

  startWorker(t, redis, 'batch', uploadDir, { delayMs: 20 })
  const final = await client.waitFor(m => m.status !== 'processing')
  t.same(final, { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 5, total: 5, eta_seconds: 0 })
  const closed = await client.closed
  t.equal(closed.code, 1000)
  const processed = client.messages.map(m => m.processed)
  t.same(processed, [...processed].sort((a, b) => a - b), 'progress never goes back')
  const repeats = client.messages.filter((m, i) => i > 0 && JSON.stringify(m) === JSON.stringify(client.messages[i - 1]))
  t.same(repeats, [], 'no message repeats the one before it (queued and active both read processing 0/0)')
})
