import t from 'tap'
import { randomUUID } from 'node:crypto'
import { WatchTokens } from '../lib/http/auth/watch-token'
import { connect, lines, redisFor, startApp, startWorker, upload } from './helpers/index'
import { Cluster, SESSION_SECRET } from './helpers/cluster'
import { sse } from './helpers/sse'

const NOT_FOUND = { statusCode: 404, code: 'FST_JP_JOB_NOT_FOUND', message: 'Job not found or access denied' }

async function get (url: string, init: RequestInit = {}): Promise<{ status: number, body: any }> {
  const res = await fetch(url, init)
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

t.test('sign and verify: one row per case', async (t) => {
  const now = Date.parse('2026-01-01T00:00:00Z')
  const tokens = new WatchTokens(['new-secret-of-enough-length', 'old-secret-of-enough-length'], 60)
  const oldOnly = new WatchTokens(['old-secret-of-enough-length'], 60)
  const stranger = new WatchTokens(['another-secret-of-enough-length'], 60)
  const grant = { kind: 'batch', jobId: randomUUID(), owner: 'session:x' }
  const good = tokens.sign(grant, now).token
  const [payload, mac] = good.split('.')
  const otherPayload = Buffer.from(JSON.stringify({ k: 'batch', j: randomUUID(), o: 'session:x', e: now / 1000 + 60 })).toString('base64url')
  const rows: Array<[string, WatchTokens, string, number, boolean]> = [
    ['fresh token', tokens, good, now, true],
    ['one second before expiry', tokens, good, now + 59_000, true],
    ['at expiry', tokens, good, now + 60_000, false],
    ['signed by an old secret still listed (rotation)', tokens, oldOnly.sign(grant, now).token, now, true],
    ['signed by a secret not listed', tokens, stranger.sign(grant, now).token, now, false],
    ['payload swapped for another job, MAC kept', tokens, `${otherPayload}.${mac}`, now, false],
    ['MAC cut short', tokens, `${payload}.${mac.slice(0, 10)}`, now, false],
    ['no MAC', tokens, payload, now, false],
    ['three parts', tokens, `${good}.x`, now, false],
    ['empty', tokens, '', now, false],
    ['too long', tokens, 'a'.repeat(5000), now, false]
  ]
  for (const [name, verifier, token, at, ok] of rows) {
    const got = verifier.verify(token, at)
    if (ok) t.match(got, { ...grant, exp: now / 1000 + 60 }, name)
    else t.equal(got, null, name)
  }
  // Signed, but not a grant (a MAC over a payload of another shape).
  const { createHmac } = await import('node:crypto')
  const odd = Buffer.from(JSON.stringify({ k: 1 })).toString('base64url')
  const oddMac = createHmac('sha256', 'new-secret-of-enough-length').update(`jp-watch-v1.${odd}`).digest('base64url')
  t.equal(tokens.verify(`${odd}.${oddMac}`, now), null, 'signed payload without the fields')
  const junk = Buffer.from('not json').toString('base64url')
  const junkMac = createHmac('sha256', 'new-secret-of-enough-length').update(`jp-watch-v1.${junk}`).digest('base64url')
  t.equal(tokens.verify(`${junk}.${junkMac}`, now), null, 'signed payload that is not JSON')
  t.throws(() => new WatchTokens([], 60), /at least one secret/)
})

t.test('across two real instances: a token from A watches the job on B (ws, SSE, status, result) without the session; bad tokens answer like an unknown job', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, env: { ITEM_DELAY_MS: '40' } })
  const [a, b] = cluster.apis
  const up = await upload(`${a.url}/batch/upload`, lines(30))
  t.equal(up.status, 202)
  const jobId: string = up.body.job_id
  const token: string = up.body.watch_token
  t.type(token, 'string', 'the 202 carries a watch token')
  const other = await upload(`${a.url}/batch/upload`, lines(1), { cookie: up.cookie })
  const q = (tok: string): string => `?token=${encodeURIComponent(tok)}`

  // WebSocket on B with the token alone: the whole job, to its final message and a normal close.
  const ws = connect(t, `${b.ws}/ws/batch/${jobId}${q(token)}`)
  const events = await sse(t, `${b.url}/batch/${jobId}/events${q(token)}`)
  t.equal(events.status, 200, 'SSE on B with the token')
  t.same(await ws.closed, { code: 1000, reason: 'job finished' })
  t.equal(ws.messages.at(-1).status, 'complete')
  await events.waitFor(e => e.event === 'close', 20_000)

  const status = await get(`${b.url}/batch/${jobId}/status${q(token)}`)
  t.equal(status.status, 200)
  t.equal(status.body.status, 'complete')
  const result = await get(`${b.url}/batch/${jobId}/result${q(token)}`)
  t.equal(result.status, 200)
  t.equal(result.body.job_id, jobId)

  // The jobs protocol on B: the token's job subscribes; another job of the same owner does not.
  const mux = connect(t, `${b.ws}/api/v1/ws/jobs${q(token)}`)
  await mux.waitFor(m => m.type === 'connected')
  mux.send({ action: 'subscribe', job_id: jobId })
  t.equal((await mux.waitFor(m => m.type === 'job_update')).job_id, jobId)
  mux.send({ action: 'subscribe', job_id: other.body.job_id })
  t.match(await mux.waitFor(m => m.type === 'error'), { message: `Job not found or access denied: ${other.body.job_id}` }, "the owner's other job is not granted")

  // Expired (signed with the cluster's secret an hour ago), forged, another job's, and a token
  // given as Bearer: each answers exactly like a job that does not exist.
  const signer = new WatchTokens([SESSION_SECRET], 60)
  const owner = JSON.parse(Buffer.from(token.split('.')[0], 'base64url').toString()).o
  const bad: Record<string, string> = {
    expired: signer.sign({ kind: 'batch', jobId, owner }, Date.now() - 3600_000).token,
    forged: new WatchTokens(['a-secret-nobody-configured'], 60).sign({ kind: 'batch', jobId, owner }).token,
    'another job': other.body.watch_token,
    'another kind': signer.sign({ kind: 'dataset', jobId, owner }).token,
    garbage: 'x.y'
  }
  const missing = await get(`${b.url}/batch/${randomUUID()}/status${q(token)}`)
  t.equal(missing.status, 404)
  for (const [name, tok] of Object.entries(bad)) {
    for (const route of ['status', 'result']) {
      const res = await get(`${b.url}/batch/${jobId}/${route}${q(tok)}`)
      t.equal(res.status, 404, `${name} token, ${route}: 404`)
      t.same(res.body, missing.body, `${name} token, ${route}: the same body as an unknown job`)
      t.match(res.body, NOT_FOUND)
    }
    const client = connect(t, `${b.ws}/ws/batch/${jobId}${q(tok)}`)
    t.same(await client.closed, { code: 4003, reason: 'job not found or access denied' }, `${name} token, ws`)
    t.same(client.messages, [], `${name} token, ws: no job data`)
    const stream = await sse(t, `${b.url}/batch/${jobId}/events${q(tok)}`)
    t.equal(stream.status, 404, `${name} token, SSE`)
  }
  // A token that does not verify leaves the request's own credentials to decide.
  t.equal((await get(`${b.url}/batch/${jobId}/status${q(bad.forged)}`, { headers: { cookie: up.cookie as string } })).status, 200, "the owner's cookie with a bad token: the cookie decides")
  const strangerBad = await upload(`${a.url}/batch/upload`, lines(1))
  t.same((await get(`${b.url}/batch/${jobId}/status${q(bad.forged)}`, { headers: { cookie: strangerBad.cookie as string } })).body, missing.body, 'another session with a bad token: like an unknown job')
  const bearer = await get(`${b.url}/batch/${jobId}/status`, { headers: { authorization: `Bearer ${token}` } })
  t.equal(bearer.status, 401, 'a watch token is not an API key: Bearer does not take it')

  // A token watches; it does not cancel, and it cannot mint itself a longer life.
  t.equal((await get(`${b.url}/batch/${other.body.job_id}/cancel${q(other.body.watch_token)}`, { method: 'POST' })).status, 401)
  t.equal((await get(`${b.url}/batch/${jobId}/watch-token${q(token)}`, { method: 'POST' })).status, 401)

  // The owner mints a fresh token on B; it works on A.
  const minted = await get(`${b.url}/batch/${jobId}/watch-token`, { method: 'POST', headers: { cookie: up.cookie as string } })
  t.equal(minted.status, 200)
  t.equal(minted.body.job_id, jobId)
  t.ok(Date.parse(minted.body.expires_at) > Date.now(), 'expires_at in the future')
  t.equal((await get(`${a.url}/batch/${jobId}/status${q(minted.body.watch_token)}`)).status, 200)
  // Somebody else cannot mint one for the job.
  const stranger = await upload(`${a.url}/batch/upload`, lines(1))
  const refused = await get(`${b.url}/batch/${jobId}/watch-token`, { method: 'POST', headers: { cookie: stranger.cookie as string } })
  t.equal(refused.status, 404)
  t.same(refused.body, missing.body)
})

t.test('with a getOwner hook and its own watch-token secrets: the token works without the hook vouching; rotation keeps old tokens valid', async (t) => {
  const redis = await redisFor(t)
  const getOwner = (request: { headers: Record<string, unknown> }): string | undefined => request.headers['x-user'] as string | undefined
  const before = await startApp(t, redis, { getOwner, watchTokens: { secret: 'first-watch-secret-long-enough' } })
  const up = await upload(`${before.url}/batch/upload`, lines(2), { headers: { 'x-user': 'alice' } })
  t.equal(up.status, 202)
  const after = await startApp(t, redis, { getOwner, watchTokens: { secret: ['second-watch-secret-long-enough', 'first-watch-secret-long-enough'], ttlSeconds: 5 } })
  const res = await get(`${after.url}/batch/${up.body.job_id}/status?token=${up.body.watch_token}`)
  t.equal(res.status, 200, 'a token signed before the rotation still verifies')
  const minted = await get(`${after.url}/batch/${up.body.job_id}/watch-token`, { method: 'POST', headers: { 'x-user': 'alice' } })
  t.ok(Date.parse(minted.body.expires_at) - Date.now() <= 5_000, 'ttlSeconds applies')
  t.equal((await get(`${before.url}/batch/${up.body.job_id}/status?token=${minted.body.watch_token}`)).status, 404, 'the old instance does not know the new secret')
  t.equal((await get(`${after.url}/batch/${up.body.job_id}/status?token=a&token=b`)).status, 404, 'token given twice')
  startWorker(t, redis, 'batch', after.uploadDir)
  const ws = connect(t, `${after.ws}/ws/batch/${up.body.job_id}?token=${up.body.watch_token}`, { headers: { origin: 'https://evil.example' } })
  t.same(await ws.closed, { code: 4003, reason: 'origin not allowed' }, 'Origin rules apply to tokens as to sessions')
})

t.test('without any secret no tokens are issued and ?token= is not looked at', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { getOwner: () => 'bob', session: {} })
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  t.equal(up.status, 202)
  t.notOk('watch_token' in up.body)
  t.equal((await get(`${app.url}/batch/${up.body.job_id}/watch-token`, { method: 'POST' })).status, 404, 'no mint route')
  t.equal((await get(`${app.url}/batch/${up.body.job_id}/status?token=x.y`)).status, 200, 'the hook decides')
})
