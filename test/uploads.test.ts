import t, { type Test } from 'tap'
import { request as httpRequest } from 'node:http'
import { setTimeout as sleep } from 'node:timers/promises'
import {
  connect, eventually, filesIn, jobKeys, lines, redisFor, startApp, startWorker, upload,
  type RedisServer, type TestApp
} from './helpers/index'

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/

/** A multipart POST of a form built by the test (parts in the order given). */
async function post (url: string, form: FormData, cookie?: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { method: 'POST', body: form, headers: cookie === undefined ? {} : { cookie } })
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

function file (content: string, type = 'text/plain'): Blob {
  return new Blob([content], { type })
}

/** What a refused upload must leave: no stored file (not even a partial one) and no job. */
async function assertNothingLeft (t: Test, redis: RedisServer, app: TestApp): Promise<void> {
  t.same(await filesIn(app.uploadDir), [], 'no file left in uploadDir')
  t.same(await jobKeys(redis, 'batch'), [], 'no job hash in Redis')
  const counts = await app.app.jobProgress.queues.get('batch')!.getJobCounts()
  t.same(Object.values(counts).filter(n => n > 0), [], 'the queue counts no job')
}

t.test('no file: 400 with a message saying to send one, nothing left', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/batch/upload`, null, { fields: { note: 'hello' } })
  t.equal(res.status, 400)
  t.match(res.body, { code: 'FST_JP_NO_FILE', message: /No file uploaded: send one file in a multipart\/form-data request/ })
  await assertNothingLeft(t, redis, app)
})

t.test('more than one file: 413 naming the one-file rule, the first stored file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/batch/upload`, lines(50), { files: 2 })
  t.equal(res.status, 413)
  t.match(res.body, { code: 'FST_JP_TOO_MANY_FILES', message: /Only one file may be uploaded per request/ })
  await assertNothingLeft(t, redis, app)
})

t.test('empty file: 400 naming the file, nothing left', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/batch/upload`, '', { filename: 'empty.csv' })
  t.equal(res.status, 400)
  t.match(res.body, { code: 'FST_JP_EMPTY_FILE', message: 'The uploaded file "empty.csv" is empty' })
  await assertNothingLeft(t, redis, app)
})

t.test('over limits.fileSize: 413 naming the limit, partial file deleted, no job', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { limits: { fileSize: 1024 } })
  const res = await upload(`${app.url}/batch/upload`, 'x'.repeat(256 * 1024))
  t.equal(res.status, 413)
  t.match(res.body, { code: 'FST_JP_FILE_TOO_LARGE', message: 'The uploaded file is larger than the limit of 1024 bytes' })
  await assertNothingLeft(t, redis, app)
  // Just under the limit is accepted: the limit is the boundary, not a guess.
  const ok = await upload(`${app.url}/batch/upload`, 'x'.repeat(1024))
  t.equal(ok.status, 202)
})

t.test("over a kind's maxFileSize: 413 naming the kind's limit, nothing left", async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { maxFileSize: 100 }, dataset: {} } })
  const res = await upload(`${app.url}/batch/upload`, 'y'.repeat(5000))
  t.equal(res.status, 413)
  t.match(res.body, { message: 'The uploaded file is larger than the limit of 100 bytes' })
  await assertNothingLeft(t, redis, app)
  t.equal((await upload(`${app.url}/dataset/upload`, 'y'.repeat(5000))).status, 202, 'another kind keeps the global limit')
})

t.test('a type the kind does not accept: 415 naming the type and what is accepted', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { accept: ['text/plain', '.csv'] } } })
  const res = await upload(`${app.url}/batch/upload`, 'PNG', { filename: 'picture.png', type: 'image/png' })
  t.equal(res.status, 415)
  t.match(res.body, { code: 'FST_JP_UNSUPPORTED_FILE_TYPE', message: 'Files of type "image/png" are not accepted here; accepted: text/plain, .csv' })
  await assertNothingLeft(t, redis, app)

  const byType = await upload(`${app.url}/batch/upload`, lines(2), { filename: 'a.txt', type: 'text/plain' })
  t.equal(byType.status, 202, 'an accepted MIME type passes')
  const byExt = await upload(`${app.url}/batch/upload`, lines(2), { filename: 'a.CSV', type: 'application/octet-stream' })
  t.equal(byExt.status, 202, 'an accepted extension passes whatever the type')
})

t.test('too many parts: 413 naming the limit, the stored file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { limits: { parts: 3 } })
  const form = new FormData()
  form.append('file', file(lines(20)), 'records.txt')
  for (let i = 0; i < 5; i++) form.append(`f${i}`, String(i))
  const res = await post(`${app.url}/batch/upload`, form)
  t.equal(res.status, 413)
  t.match(res.body, { code: 'FST_JP_TOO_MANY_PARTS', message: 'The form has too many parts: at most 3 (fields and files together)' })
  await assertNothingLeft(t, redis, app)
})

t.test('too many fields: 413 naming the limit, the stored file removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { limits: { fields: 2 } })
  const form = new FormData()
  form.append('file', file(lines(20)), 'records.txt')
  for (let i = 0; i < 4; i++) form.append(`f${i}`, String(i))
  const res = await post(`${app.url}/batch/upload`, form)
  t.equal(res.status, 413)
  t.match(res.body, { code: 'FST_JP_TOO_MANY_FIELDS', message: 'The form has too many fields: at most 2' })
  await assertNothingLeft(t, redis, app)
})

t.test('fields within the limits reach the job', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/batch/upload`, lines(2), { fields: { note: 'hello' } })
  t.equal(res.status, 202)
  const job = await app.app.jobProgress.queues.get('batch')!.getJob(res.body.job_id)
  t.same(job?.data.fields, { note: 'hello' })
  t.match(job?.data.file, { name: 'records.txt', size: lines(2).length, type: 'text/plain' })
})

t.test('unknown kind: 404 with a readable message, nothing left', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/nope/upload`, lines(2))
  t.equal(res.status, 404)
  t.match(res.body, { message: /not found/i })
  await assertNothingLeft(t, redis, app)
})

t.test('a non-multipart POST to the upload route: 415 saying to send multipart, nothing left', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await fetch(`${app.url}/batch/upload`, { method: 'POST', body: JSON.stringify({ file: 'x' }), headers: { 'content-type': 'application/json' } })
  t.equal(res.status, 415)
  t.match(await res.json(), { code: 'FST_JP_NOT_MULTIPART', message: 'Uploads must be sent as multipart/form-data' })
  const plain = await fetch(`${app.url}/batch/upload`, { method: 'POST', body: 'item-1\n', headers: { 'content-type': 'text/plain' } })
  t.equal(plain.status, 415)
  t.match(await plain.json(), { message: /multipart\/form-data/ })
  await assertNothingLeft(t, redis, app)
})

t.test('malformed job id: 404 on status, ws closes 4003 "job not found or access denied"', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const { cookie } = await upload(`${app.url}/batch/upload`, lines(1))
  for (const bad of ['not-a-uuid', '1', 'A'.repeat(80), '..%2F..%2Fetc', '00000000-0000-0000-0000-00000000000g']) {
    const res = await fetch(`${app.url}/batch/${bad}/status`, { headers: { cookie: cookie! } })
    t.equal(res.status, 404, `status of "${bad.slice(0, 20)}"`)
    t.match(await res.json(), { message: 'Job not found or access denied' })
  }
  const client = connect(t, `${app.ws}/ws/batch/not-a-uuid`, { cookie })
  const closed = await client.closed
  t.same(closed, { code: 4003, reason: 'job not found or access denied' })
  t.same(client.messages, [], 'nothing sent before the close')
})

t.test('Redis unreachable at upload: 503 with a readable message, no file, no job', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  await redis.down()
  try {
    t.ok(await eventually(() => !app.app.jobProgress.redisReady()), 'the plugin noticed Redis is gone')
    const res = await upload(`${app.url}/batch/upload`, lines(100))
    t.equal(res.status, 503)
    t.match(res.body, { code: 'FST_JP_QUEUE_UNAVAILABLE', message: /Redis unreachable.*try again later/ })
    t.same(await filesIn(app.uploadDir), [], 'no file left in uploadDir')
  } finally {
    await redis.up()
  }
  t.ok(await eventually(() => app.app.jobProgress.redisReady(), 10_000), 'the plugin reconnects')
  await assertNothingLeft(t, redis, app)
  t.equal((await upload(`${app.url}/batch/upload`, lines(1))).status, 202, 'uploads work again once Redis is back')
})

t.test('the client aborts mid-upload: the partial file is removed and no job is added', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const boundary = 'jp-test-boundary-0123456789'
  const req = httpRequest(`${app.url}/batch/upload`, {
    method: 'POST',
    headers: { 'content-type': `multipart/form-data; boundary=${boundary}` }
  })
  req.on('error', () => {})
  t.teardown(() => req.destroy())
  req.write(`--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\nContent-Type: text/plain\r\n\r\n`)
  // Keep writing slowly until the server is visibly storing the file, then vanish.
  let storing = false
  for (let i = 0; i < 200 && !storing; i++) {
    req.write('item\n'.repeat(2000))
    await sleep(10)
    storing = (await filesIn(app.uploadDir)).some(f => f.endsWith('.part'))
  }
  t.ok(storing, 'the server was writing the upload when the client left')
  req.destroy()
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'the partial file is removed')
  await assertNothingLeft(t, redis, app)
  t.equal((await upload(`${app.url}/batch/upload`, lines(1))).status, 202, 'the server still takes uploads')
})

t.test('a socket frame over maxPayload closes the socket with 1009', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { maxPayload: 64 })
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.job_id === up.body.job_id)
  client.send('x'.repeat(65))
  const closed = await client.closed
  t.equal(closed.code, 1009)
})

t.test('binary frames on /ws/batch/:id are ignored: the socket stays open and gets the final message', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  t.match(up.body.job_id, UUID)
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  client.socket.send(Buffer.from([0, 1, 2, 3, 255]), { binary: true })
  client.socket.send(Buffer.from('{"action":"cancel"}'), { binary: true })
  await sleep(150)
  t.equal(client.socket.readyState, client.socket.OPEN, 'still open after binary frames')
  t.equal(client.messages.length, 1, 'and nothing was sent in reply')
  startWorker(t, redis, 'batch', app.uploadDir)
  const final = await client.waitFor(m => m.status === 'complete')
  t.equal(final.processed, 3)
  t.equal((await client.closed).code, 1000)
})

t.test("text 'ping' is ignored: no reply, the socket stays open and gets the final message", async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  client.send('ping')
  client.send('ping')
  await sleep(150)
  t.equal(client.socket.readyState, client.socket.OPEN, 'still open after ping')
  t.equal(client.messages.length, 1, 'no reply to ping')
  startWorker(t, redis, 'batch', app.uploadDir)
  await client.waitFor(m => m.status === 'complete')
  t.equal((await client.closed).code, 1000)
  t.notOk(client.messages.some(m => typeof m === 'string'), 'every message is JSON')
})

t.test('Redis down: the app still closes, and promptly', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  await redis.down()
  t.teardown(async () => await redis.up())
  t.ok(await eventually(() => !app.app.jobProgress.redisReady()), 'the plugin noticed Redis is gone')
  // Let every connection fall into its reconnect wait, where a pending blocking read is stranded.
  await sleep(100)
  const started = Date.now()
  const closed = await Promise.race([app.app.close().then(() => true), sleep(5_000).then(() => false)])
  t.ok(closed, 'close() finished')
  t.ok(Date.now() - started < 5_000, `within ${Date.now() - started} ms`)
})
