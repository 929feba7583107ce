import t from 'tap'
import { connect, lines, redisFor, startApp, upload } from './helpers/index'

const LONG = 'a'.repeat(150)
const TOO_LONG = { statusCode: 400, code: 'FST_JP_JOB_ID_TOO_LONG', message: 'Job id too long: job ids are UUIDs, and no id longer than 100 characters is accepted' }

async function call (method: string, url: string, cookie?: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { method, headers: cookie === undefined ? {} : { cookie } })
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

t.test('a job id over the router limit: a clear 400 on every job route and the socket, not a bare 414', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  for (const [method, path] of [['GET', 'status'], ['GET', 'result'], ['POST', 'cancel'], ['GET', 'events']]) {
    const res = await call(method, `${app.url}/batch/${LONG}/${path}`, up.cookie)
    t.equal(res.status, 400, `${method} ${path}`)
    t.match(res.body, TOO_LONG)
  }
  const socket = connect(t, `${app.ws}/ws/batch/${LONG}`, { cookie: up.cookie })
  t.same(await socket.closed, { code: 1008, reason: 'job id too long: at most 100 characters' }, 'the socket closes with the reason')
  const deeper = connect(t, `${app.ws}/ws/batch/x/y`, { cookie: up.cookie })
  t.same(await deeper.closed, { code: 4003, reason: 'job not found or access denied' }, 'another socket path under the kind: not found')

  // What the catch-all does not own is answered as before it existed.
  const short = await call('GET', `${app.url}/batch/${'b'.repeat(60)}/status`, up.cookie)
  t.match(short, { status: 404, body: { code: 'FST_JP_JOB_NOT_FOUND' } }, 'a shorter bad id: not found, as before')
  const other = await call('GET', `${app.url}/batch/x/y/z`)
  t.match(other, { status: 404, body: { message: 'Route GET:/batch/x/y/z not found' } }, "other paths: Fastify's not-found answer")
  t.equal((await call('GET', `${app.url}/batch/${up.body.job_id}/status`, up.cookie)).status, 200, 'real ids unaffected')
})
