import t, { type Test } from 'tap'
import { request as httpRequest, type ClientRequest, type IncomingMessage } from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import { eventually, filesIn, jobKeys, lines, redisFor, startApp, upload, type RedisServer, type TestApp } from './helpers/index'

const BOUNDARY = 'jp-limits-boundary-42'

interface Answer { status: number, body: any }

/** A raw POST: the body is written by the test, byte by byte if it wants. */
function rawPost (url: string, contentType: string | null): { req: ClientRequest, answer: Promise<Answer> } {
  const req = httpRequest(url, { method: 'POST', headers: contentType === null ? {} : { 'content-type': contentType } })
  const answer = new Promise<Answer>((resolve, reject) => {
    req.on('error', reject)
    req.on('response', (res: IncomingMessage) => {
      let text = ''
      res.on('data', (c: Buffer) => { text += c.toString() })
      res.on('end', () => {
        let body: unknown = text
        try { body = JSON.parse(text) } catch {}
        resolve({ status: res.statusCode ?? 0, body })
      })
      res.on('error', reject)
    })
  })
  answer.catch(() => {})
  return { req, answer }
}

async function send (url: string, contentType: string | null, body: string | Buffer): Promise<Answer> {
  const { req, answer } = rawPost(url, contentType)
  req.end(body)
  return await answer
}

const filePart = (boundary: string, content: string): string =>
  `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="records.txt"\r\nContent-Type: text/plain\r\n\r\n${content}\r\n`

async function assertNothingLeft (t: Test, redis: RedisServer, app: TestApp): Promise<void> {
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'no file (not even a partial one) left')
  t.same(await jobKeys(redis, 'batch'), [], 'no job')
}

t.test('malformed multipart bodies are answered 400 with a message, never 500', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const url = `${app.url}/batch/upload`
  const cases: Array<[string, string | null, string | Buffer]> = [
    ['no boundary parameter', 'multipart/form-data', filePart(BOUNDARY, 'item-1') + `--${BOUNDARY}--\r\n`],
    ['a boundary the body does not use', `multipart/form-data; boundary=${BOUNDARY}`, filePart('other-boundary', 'item-1') + '--other-boundary--\r\n'],
    ['no final boundary', `multipart/form-data; boundary=${BOUNDARY}`, filePart(BOUNDARY, 'item-1\nitem-2\n')],
    ['random bytes', `multipart/form-data; boundary=${BOUNDARY}`, Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 7919 + 13) % 256))],
    ['unterminated part headers', `multipart/form-data; boundary=${BOUNDARY}`, `--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/pl`]
  ]
  for (const [name, type, body] of cases) {
    const res = await send(url, type, body)
    t.equal(res.status, 400, `${name}: 400`)
    t.match(res.body, { message: /\S/ }, `${name}: with a message (${JSON.stringify(res.body?.message)})`)
  }
  await assertNothingLeft(t, redis, app)
  t.equal((await upload(url, lines(2))).status, 202, 'the server still takes good uploads')
})

t.test('a field longer than limits.fieldSize: 413 naming the field, no job with a cut value', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { limits: { fieldSize: 100 } })
  const res = await upload(`${app.url}/batch/upload`, lines(3), { fields: { note: 'x'.repeat(101) } })
  t.equal(res.status, 413)
  t.match(res.body, { code: 'FST_JP_FIELD_TOO_LARGE', message: 'The form field "note" is longer than the limit of 100 bytes' })
  await assertNothingLeft(t, redis, app)
  const ok = await upload(`${app.url}/batch/upload`, lines(3), { fields: { note: 'x'.repeat(100) } })
  t.equal(ok.status, 202, 'a field at the limit is accepted')
})

/** Starts an upload whose file part never ends; resolves once the server is writing it. */
async function startSlowUpload (t: Test, app: TestApp): Promise<{ req: ClientRequest, answer: Promise<Answer> }> {
  const { req, answer } = rawPost(`${app.url}/batch/upload`, `multipart/form-data; boundary=${BOUNDARY}`)
  t.teardown(() => req.destroy())
  req.write(`--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.txt"\r\nContent-Type: text/plain\r\n\r\n`)
  req.write('item-1\n'.repeat(1000))
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).some(f => f.endsWith('.part'))), 'the server is writing the partial file')
  return { req, answer }
}

t.test('an upload that goes idle is ended with 408 and its partial file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { uploads: { idleTimeoutMs: 500 } })
  const started = Date.now()
  const { answer } = await startSlowUpload(t, app)
  const res = await answer
  t.equal(res.status, 408)
  t.match(res.body, { code: 'FST_JP_UPLOAD_IDLE', message: /sent no data for 500 ms/ })
  t.ok(Date.now() - started < 5_000, 'ended soon after the idle limit')
  await assertNothingLeft(t, redis, app)
})

t.test('an upload that trickles past the request timeout is ended with 408, partial file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { uploads: { idleTimeoutMs: 1_000, requestTimeoutMs: 1_500 } })
  const { req, answer } = await startSlowUpload(t, app)
  // One byte every 100 ms: never idle, but never done.
  const timer = setInterval(() => req.write('x'), 100)
  t.teardown(() => clearInterval(timer))
  const res = await answer
  clearInterval(timer)
  t.equal(res.status, 408)
  t.match(res.body, { code: 'FST_JP_UPLOAD_TIMEOUT', message: /took longer than 1500 ms/ })
  await assertNothingLeft(t, redis, app)
})

t.test('app.close() does not wait for a trickling upload past shutdownGraceMs: 503, partial file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { uploads: { shutdownGraceMs: 300 } })
  const { req, answer } = await startSlowUpload(t, app)
  const timer = setInterval(() => req.write('x'), 100)
  t.teardown(() => clearInterval(timer))
  const started = Date.now()
  await app.app.close()
  const took = Date.now() - started
  clearInterval(timer)
  t.ok(took < 3_000, `close took ${took} ms`)
  const res = await answer
  t.equal(res.status, 503)
  t.match(res.body, { code: 'FST_JP_SHUTTING_DOWN', message: /shutting down/ })
  t.same(await filesIn(app.uploadDir), [], 'the partial file is removed')
  t.same(await jobKeys(redis, 'batch'), [], 'no job')
})

t.test('an upload that ends within the grace period still succeeds at close', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { uploads: { shutdownGraceMs: 5_000 } })
  const { req, answer } = await startSlowUpload(t, app)
  const closed = app.app.close()
  await sleep(200)
  req.end(`\r\n--${BOUNDARY}--\r\n`)
  const res = await answer
  t.equal(res.status, 202, 'the upload that finished in time is accepted')
  await closed
})

t.test('ws_url: from publicUrl, else a path; never from the Host header', async (t) => {
  const redis = await redisFor(t)
  const withBase = await startApp(t, redis, { publicUrl: 'https://jobs.example.com/app/' })
  const a = await upload(`${withBase.url}/batch/upload`, lines(1), { headers: { host: 'evil.example' } })
  t.equal(a.status, 202)
  t.equal(a.body.ws_url, `wss://jobs.example.com/app/ws/batch/${a.body.job_id}`, 'https becomes wss, the path prefix is kept')

  const relative = await startApp(t, redis, { publicUrl: undefined })
  const b = await upload(`${relative.url}/batch/upload`, lines(1), { headers: { host: 'evil.example', 'x-forwarded-host': 'evil.example', 'x-forwarded-proto': 'https' } })
  t.equal(b.status, 202)
  t.equal(b.body.ws_url, `/ws/batch/${b.body.job_id}`, 'a path, resolved by the client against the URL it called')
  t.notMatch(JSON.stringify(b.body), /evil/, 'nothing of the request headers is reflected')
})
