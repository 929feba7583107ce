import t from 'tap'
import { Signer } from '@fastify/cookie'
import { randomUUID } from 'node:crypto'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

const NOT_FOUND = { statusCode: 404, code: 'FST_JP_JOB_NOT_FOUND', message: 'Job not found or access denied' }

async function call (method: 'GET' | 'POST', url: string, headers: Record<string, string> = {}): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { method, headers })
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

/** status, result and cancel of a job, as one caller sees them. */
async function routes (base: string, jobId: string, headers: Record<string, string>): Promise<Array<{ status: number, body: any }>> {
  return [
    await call('GET', `${base}/batch/${jobId}/status`, headers),
    await call('GET', `${base}/batch/${jobId}/result`, headers),
    await call('POST', `${base}/batch/${jobId}/cancel`, headers)
  ]
}

t.test('another session is refused: ws 4003 before any message; status, result, cancel 404 like a missing job', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const mine = await upload(`${app.url}/batch/upload`, lines(3))
  const other = await upload(`${app.url}/batch/upload`, lines(1))
  t.not(other.cookie, mine.cookie, 'two sessions')

  const intruder = connect(t, mine.body.ws_url, { cookie: other.cookie })
  t.same(await intruder.closed, { code: 4003, reason: 'job not found or access denied' })
  t.same(intruder.messages, [], 'no job data before the close')

  const theirs = await routes(app.url, mine.body.job_id, { cookie: other.cookie! })
  const missing = await routes(app.url, randomUUID(), { cookie: other.cookie! })
  for (const [i, res] of theirs.entries()) {
    t.equal(res.status, 404)
    t.match(res.body, NOT_FOUND)
    t.same(res.body, missing[i].body, "someone else's job and a missing job answer alike")
  }

  const status = await call('GET', `${app.url}/batch/${mine.body.job_id}/status`, { cookie: mine.cookie! })
  t.equal(status.status, 200)
  t.equal(status.body.status, 'processing', "the intruder's cancel did nothing")

  const owner = connect(t, mine.body.ws_url, { cookie: mine.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  t.equal((await owner.waitFor(m => m.status !== 'processing')).status, 'complete', 'the owner still follows it')
})

t.test('no session at all: ws 4001, HTTP 401 with a readable message', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(2))

  const client = connect(t, up.body.ws_url)
  t.same(await client.closed, { code: 4001, reason: 'authentication required: no session or API key' })
  t.same(client.messages, [])
  for (const res of await routes(app.url, up.body.job_id, {})) {
    t.equal(res.status, 401)
    t.match(res.body, { code: 'FST_JP_UNAUTHORIZED', message: 'Authentication required: no session or API key' })
  }
})

t.test('a forged, unsigned or tampered cookie counts as no session', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const [, value] = up.cookie!.split('=')
  const sid = decodeURIComponent(value).split('.')[0]
  const signature = decodeURIComponent(value).slice(sid.length)
  const forged = {
    unsigned: `jp_session=${sid}`,
    'signed with another secret': `jp_session=${encodeURIComponent(new Signer('not-the-secret-of-this-app').sign(sid))}`,
    'tampered value': `jp_session=${encodeURIComponent(randomUUID() + signature)}`,
    garbage: 'jp_session=%%%'
  }
  for (const [name, cookie] of Object.entries(forged)) {
    const client = connect(t, up.body.ws_url, { cookie })
    t.equal((await client.closed).code, 4001, `${name}: ws 4001`)
    t.same(client.messages, [], `${name}: nothing sent`)
    const res = await call('GET', `${app.url}/batch/${up.body.job_id}/status`, { cookie })
    t.equal(res.status, 401, `${name}: HTTP 401`)
  }
  // A forged cookie on an upload starts a new session instead of borrowing one.
  const again = await upload(`${app.url}/batch/upload`, lines(1), { cookie: forged.unsigned })
  t.equal(again.status, 202)
  t.not(again.cookie, forged.unsigned, 'a fresh signed cookie is issued')
  t.equal((await call('GET', `${app.url}/batch/${up.body.job_id}/status`, { cookie: again.cookie! })).status, 404)
})

t.test('the session cookie is HttpOnly, SameSite=Lax, Path=/ and signed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const form = new FormData()
  form.append('file', new Blob([lines(1)], { type: 'text/plain' }), 'a.txt')
  const res = await fetch(`${app.url}/batch/upload`, { method: 'POST', body: form })
  t.equal(res.status, 202)
  const cookies = res.headers.getSetCookie()
  t.equal(cookies.length, 1)
  const [pair, ...attrs] = cookies[0].split(';').map(s => s.trim())
  t.match(pair, /^jp_session=[0-9a-f-]{36}\.[^;]+$/, 'name=uuid.signature')
  const lower = attrs.map(a => a.toLowerCase())
  t.ok(lower.includes('httponly'), 'HttpOnly')
  t.ok(lower.includes('samesite=lax'), 'SameSite=Lax')
  t.ok(lower.includes('path=/'), 'Path=/')
  t.ok(lower.includes(`max-age=${7 * 24 * 3600}`), 'Max-Age is the default week')
  t.notOk(lower.includes('secure'), 'not Secure over plain http (secure: auto)')

  // The same session keeps its cookie: a second upload sets none.
  const second = await upload(`${app.url}/batch/upload`, lines(1), { cookie: pair })
  t.equal(second.status, 202)
  t.equal(second.cookie, pair)
})

t.test('origin check: another site is refused with 4003, the same host is accepted', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(2))

  const evil = connect(t, up.body.ws_url, { cookie: up.cookie, origin: 'https://evil.example' })
  t.same(await evil.closed, { code: 4003, reason: 'origin not allowed' })
  t.same(evil.messages, [], 'no job data to another site')

  const lookalike = connect(t, up.body.ws_url, { cookie: up.cookie, origin: `http://127.0.0.1.evil.example:${new URL(app.url).port}` })
  t.equal((await lookalike.closed).code, 4003, 'a host that only starts like ours is refused')

  const same = connect(t, up.body.ws_url, { cookie: up.cookie, origin: app.url })
  const first = await same.waitFor(m => m.job_id === up.body.job_id)
  t.equal(first.status, 'processing', 'the same host is accepted')
})

t.test('allowedOrigins replaces the same-host rule', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { allowedOrigins: ['https://app.example'] })
  const up = await upload(`${app.url}/batch/upload`, lines(2))

  const listed = connect(t, up.body.ws_url, { cookie: up.cookie, origin: 'https://APP.example' })
  t.equal((await listed.waitFor(m => m.job_id === up.body.job_id)).status, 'processing', 'a listed origin is accepted (case-insensitive)')

  const sameHost = connect(t, up.body.ws_url, { cookie: up.cookie, origin: app.url })
  t.same(await sameHost.closed, { code: 4003, reason: 'origin not allowed' }, 'an unlisted origin is refused, even our own host')

  const noOrigin = connect(t, up.body.ws_url, { cookie: up.cookie })
  t.equal((await noOrigin.waitFor(m => m.job_id === up.body.job_id)).status, 'processing', 'a client that is not a browser sends no Origin and is accepted')
})

t.test('a custom getOwner hook decides the owner of uploads and sockets', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, {
    getOwner: async (request) => {
      const user = request.headers['x-user']
      return typeof user === 'string' ? `user:${user}` : null
    }
  })
  const anonymous = await upload(`${app.url}/batch/upload`, lines(1))
  t.equal(anonymous.status, 401, 'no owner, no upload')
  t.match(anonymous.body, { message: 'Authentication required: no credentials' })
  t.equal(anonymous.cookie, undefined, 'no session cookie is started when the hook owns identity')

  const up = await upload(`${app.url}/batch/upload`, lines(3), { headers: { 'x-user': 'alice' } })
  t.equal(up.status, 202)
  t.equal(up.cookie, undefined)
  const job = await app.app.jobProgress.queues.get('batch')!.getJob(up.body.job_id)
  t.equal(job?.data.owner, 'user:alice', 'the job records the hook\'s owner')

  const bob = connect(t, up.body.ws_url, { headers: { 'x-user': 'bob' } })
  t.same(await bob.closed, { code: 4003, reason: 'job not found or access denied' })
  const nobody = connect(t, up.body.ws_url)
  t.equal((await nobody.closed).code, 4001)
  t.equal((await call('GET', `${app.url}/batch/${up.body.job_id}/status`, { 'x-user': 'bob' })).status, 404)
  t.equal((await call('GET', `${app.url}/batch/${up.body.job_id}/status`)).status, 401)

  const alice = connect(t, up.body.ws_url, { headers: { 'x-user': 'alice' } })
  await alice.waitFor(m => m.status === 'processing')
  startWorker(t, redis, 'batch', app.uploadDir)
  t.match(await alice.waitFor(m => m.status !== 'processing'), { status: 'complete', processed: 3, total: 3 })
  t.equal((await alice.closed).code, 1000)
  const result = await call('GET', `${app.url}/batch/${up.body.job_id}/result`, { 'x-user': 'alice' })
  t.same(result, { status: 200, body: { job_id: up.body.job_id, result: { lines: 3 } } })
})
