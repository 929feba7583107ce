import t from 'tap'
import { jobsProtocol } from '../lib/index'
import { connect, lines, redisFor, startApp, upload } from './helpers/index'
import { sse } from './helpers/sse'

// A socket or SSE stream lives no longer than the session it authenticated with: once the
// session is older than `session.maxAgeSeconds` it is closed with 4001 and the reason, as the
// client's next connection would be refused.

const EXPIRED = 'session expired; upload again to start a new session'

t.test('an open socket and an SSE stream are closed with 4001 when their session expires', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { session: { secret: 'a-test-secret-of-enough-length', maxAgeSeconds: 3 }, protocols: [jobsProtocol({ path: '/ws/jobs' })] })
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  const issued = Date.now()
  const socket = connect(t, `${app.ws}/ws/jobs`, { cookie: up.cookie })
  await socket.waitFor(m => m.type === 'connected')
  const stream = await sse(t, `${app.url}/batch/${up.body.job_id}/events`, { cookie: up.cookie })
  t.equal(stream.status, 200)
  const closed = await socket.closed
  const seconds = (Date.now() - issued) / 1000
  t.same(closed, { code: 4001, reason: EXPIRED }, 'the socket is closed with the reason')
  t.ok(seconds <= 3 + 2.5, `closed ${seconds.toFixed(1)} s after the session was issued (max age 3 s)`)
  const close = await stream.waitFor(e => e.event === 'close', 5_000)
  t.same(close.data, { code: 4001, reason: EXPIRED }, 'the stream ends with a close event')
  await stream.ended
})
