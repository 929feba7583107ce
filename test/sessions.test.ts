import t from 'tap'
import { Signer } from '@fastify/cookie'
import type { FastifyRequest } from 'fastify'
import { randomUUID } from 'node:crypto'
import { apiKeyOf } from '../lib/http/auth/identity'
import { connect, eventually, lines, redisFor, startApp, upload } from './helpers/index'

const SECRET = 'a-test-secret-of-enough-length'
const EXPIRED = 'session expired; upload again to start a new session'

const cookieOf = (secret: string, value: string): string => `jp_session=${encodeURIComponent(new Signer(secret).sign(value))}`
const now = (): number => Math.floor(Date.now() / 1000)

async function status (base: string, jobId: string, headers: Record<string, string>): Promise<{ status: number, body: any }> {
  const res = await fetch(`${base}/batch/${jobId}/status`, { headers })
  return { status: res.status, body: await res.json() }
}

t.test('a session past its max age is refused on every route and socket; an upload starts a new one', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { session: { secret: SECRET, maxAgeSeconds: 60 } })
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const jobId = up.body.job_id as string
  const sid = decodeURIComponent(up.cookie!.split('=')[1]).split('.')[0]
  t.equal((await status(app.url, jobId, { cookie: up.cookie! })).status, 200, 'a fresh session works')

  const cases = {
    'issued 61 s ago': cookieOf(SECRET, `${sid}.${now() - 61}`),
    'undated (the format before sessions expired)': cookieOf(SECRET, sid),
    'issued an hour in the future': cookieOf(SECRET, `${sid}.${now() + 3600}`)
  }
  for (const [name, cookie] of Object.entries(cases)) {
    for (const [method, path] of [['GET', 'status'], ['GET', 'result'], ['POST', 'cancel']]) {
      const res = await fetch(`${app.url}/batch/${jobId}/${path}`, { method, headers: { cookie } })
      t.match({ status: res.status, body: await res.json() }, { status: 401, body: { code: 'FST_JP_UNAUTHORIZED', message: `Authentication required: ${EXPIRED}` } }, `${name}: ${path} 401`)
    }
    const socket = connect(t, up.body.ws_url, { cookie })
    t.same(await socket.closed, { code: 4001, reason: EXPIRED }, `${name}: socket 4001`)
    t.same(socket.messages, [], `${name}: nothing sent`)
  }
  const still = cookieOf(SECRET, `${sid}.${now() - 50}`)
  t.equal((await status(app.url, jobId, { cookie: still })).status, 200, 'a cookie within its max age is the same session')

  const again = await upload(`${app.url}/batch/upload`, lines(1), { cookie: cases['issued 61 s ago'] })
  t.equal(again.status, 202, 'an upload with an expired session is accepted')
  t.not(again.cookie, cases['issued 61 s ago'], 'under a new session')
  t.equal((await status(app.url, jobId, { cookie: again.cookie! })).status, 404, 'which does not own the old jobs')
})

t.test('a real session expires after maxAgeSeconds', async (t) => {
  const redis = await redisFor(t)
  // 3 s, not 1: on a loaded machine the upload and the first status read can take a second
  // between them, and the session would be refused before the read that shows it valid.
  const app = await startApp(t, redis, { session: { secret: SECRET, maxAgeSeconds: 3 } })
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  t.equal((await status(app.url, up.body.job_id, { cookie: up.cookie! })).status, 200)
  t.ok(await eventually(async () => (await status(app.url, up.body.job_id, { cookie: up.cookie! })).status === 401, 8_000, 200), 'refused once 3 s old')
})

t.test('secret rotation: the first secret signs, every listed one verifies', async (t) => {
  const redis = await redisFor(t)
  const OLD = 'the-old-secret-being-retired'
  const NEW = 'the-new-secret-now-signing'
  const before = await startApp(t, redis, { session: { secret: OLD } })
  const up = await upload(`${before.url}/batch/upload`, lines(2))
  const after = await startApp(t, redis, { session: { secret: [NEW, OLD] } })
  t.equal((await status(after.url, up.body.job_id, { cookie: up.cookie! })).status, 200, 'a cookie signed with the old secret still works')
  const fresh = await upload(`${after.url}/batch/upload`, lines(1))
  const value = decodeURIComponent(fresh.cookie!.split('=')[1])
  t.ok(new Signer(NEW).unsign(value).valid, 'new cookies are signed with the first secret')
  t.notOk(new Signer(OLD).unsign(value).valid)
  const retired = await startApp(t, redis, { session: { secret: NEW } })
  t.equal((await status(retired.url, up.body.job_id, { cookie: up.cookie! })).status, 401, 'once the old secret is dropped, its cookies are refused')
})

t.test('credentials are parsed one way: a table', async (t) => {
  const req = (headers: Record<string, string>, query: Record<string, unknown> = {}): FastifyRequest => ({ headers, query }) as unknown as FastifyRequest
  const rows: Array<[string, FastifyRequest, boolean, unknown]> = [
    ['Bearer with one space', req({ authorization: 'Bearer k-1' }), false, { key: 'k-1', from: 'header' }],
    ['scheme in another case', req({ authorization: 'bearer k-1' }), false, { key: 'k-1', from: 'header' }],
    ['token68 characters and padding', req({ authorization: 'Bearer aZ09-._~+/==' }), false, { key: 'aZ09-._~+/==', from: 'header' }],
    ['two spaces', req({ authorization: 'Bearer  k-1' }), false, /malformed Authorization header/],
    ['a tab', req({ authorization: 'Bearer\tk-1' }), false, /malformed Authorization header/],
    ['trailing space', req({ authorization: 'Bearer k-1 ' }), false, /malformed Authorization header/],
    ['no token', req({ authorization: 'Bearer' }), false, /malformed Authorization header/],
    ['a character outside token68', req({ authorization: 'Bearer k,1' }), false, /malformed Authorization header/],
    ['another scheme is not ours', req({ authorization: 'Basic dTpw' }), false, null],
    ['api_key once', req({}, { api_key: 'k-1' }), false, { key: 'k-1', from: 'query' }],
    ['api_key twice, even the same', req({}, { api_key: ['k-1', 'k-1'] }), false, /api_key given more than once/],
    ['header and query together', req({ authorization: 'Bearer k-1' }, { api_key: 'k-1' }), false, /send it one way/],
    ['subprotocol on a socket', req({ 'sec-websocket-protocol': 'k-1, other' }), true, { key: 'k-1', from: 'subprotocol' }],
    ['subprotocol on HTTP is ignored', req({ 'sec-websocket-protocol': 'k-1' }), false, null],
    ['the header wins over a subprotocol', req({ authorization: 'Bearer k-1', 'sec-websocket-protocol': 'app' }), true, { key: 'k-1', from: 'header' }],
    ['nothing', req({}), false, null]
  ]
  for (const [name, request, websocket, expected] of rows) {
    if (expected instanceof RegExp) t.throws(() => apiKeyOf(request, websocket), { statusCode: 401, message: expected }, name)
    else t.same(apiKeyOf(request, websocket), expected, name)
  }
})

t.test('malformed credentials over HTTP and sockets: 401 and 4001 with the reason', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { apiKeys: { 'k-1': 'alice' } })
  const up = await upload(`${app.url}/batch/upload`, lines(1), { headers: { authorization: 'Bearer k-1' } })
  const jobId = up.body.job_id as string
  t.equal((await status(app.url, jobId, { authorization: 'Bearer k-1' })).status, 200)
  t.match(await status(app.url, jobId, { authorization: 'Bearer  k-1' }), { status: 401, body: { message: /malformed Authorization header/ } })
  const twice = await fetch(`${app.url}/batch/${jobId}/status?api_key=k-1&api_key=k-1`)
  t.match({ status: twice.status, body: await twice.json() }, { status: 401, body: { message: 'Authentication required: api_key given more than once: send it once' } })
  const socket = connect(t, `${app.ws}/ws/batch/${jobId}?api_key=k-1&api_key=k-1`)
  t.same(await socket.closed, { code: 4001, reason: 'api_key given more than once: send it once' })
  const unknown = await status(app.url, randomUUID(), { authorization: 'Bearer k-1' })
  t.equal(unknown.status, 404)
})
