import t from 'tap'
import { randomUUID } from 'node:crypto'
import { SSE_DONE_ID, SseParser } from '../lib/wire/sse-frame'
import { lines, redisFor, startApp, startWorker, upload, gate } from './helpers/index'
import { sse } from './helpers/sse'

// Server-Sent Events: the same session as the sockets (ownership, snapshot then stream, close on
// final, limits), over a text/event-stream response.

const UUID = /^[0-9a-f-]{36}$/

t.test('parser: fields, comments, retry, CRLF, split chunks, multi-line data', async (t) => {
  const p = new SseParser()
  t.same(p.push(': hi\n\nretry: 1500\n\nid: a@1\nevent: job_update\nda'), [])
  t.equal(p.retry, 1500)
  t.same(p.push('ta: {"x":1}\n\n'), [{ id: 'a@1', event: 'job_update', data: '{"x":1}' }])
  t.same(p.push('data: one\r\ndata: two\r\n\r\nevent\ndata\n\n'), [{ event: 'message', data: 'one\ntwo' }, { event: 'message', data: '' }])
})

t.test('parser: an event\'s end split anywhere over chunks, and a long event read in linear time', async (t) => {
  for (const end of ['\n\n', '\r\n\r\n', '\n\r\n', '\r\n\n']) {
    const text = `data: x${end}data: y${end}`
    for (let cut = 1; cut < text.length; cut++) {
      const p = new SseParser()
      t.same([...p.push(text.slice(0, cut)), ...p.push(text.slice(cut))], [{ event: 'message', data: 'x' }, { event: 'message', data: 'y' }], `${JSON.stringify(end)} cut at ${cut}`)
    }
  }
  // 32 MB in 16 KiB chunks: every chunk scanned once. Searched from the start each time, as it
  // was, this is 2,048 scans of up to 32 MB (tens of seconds; the test's timeout ends it).
  const p = new SseParser()
  const chunk = 'x'.repeat(16 * 1024)
  p.push('data: ')
  let early = 0
  for (let i = 0; i < 2_048; i++) early += p.push(chunk).length
  t.equal(early, 0, 'nothing before the end')
  t.equal(p.push('\n\n')[0].data.length, 32 * 1024 * 1024)
})

t.test('one job: headers, retry, snapshot, progress, final with ids and versions; ends; Last-Event-ID done → 204', async (t) => {
  const redis = await redisFor(t)
  const { url, uploadDir, app } = await startApp(t, redis)
  const up = await upload(`${url}/batch/upload`, lines(5))
  const jobId = up.body.job_id
  const stream = await sse(t, `${url}/batch/${jobId}/events`, { cookie: up.cookie })
  t.equal(stream.status, 200)
  t.match(stream.headers['content-type'], /^text\/event-stream/)
  t.equal(stream.headers['x-accel-buffering'], 'no')
  t.match(stream.headers['cache-control'], /no-cache/)
  const first = await stream.waitFor(e => e.event === 'job_update')
  t.equal(stream.retry, 2000, 'a retry hint comes first')
  t.match(first.data, { type: 'job_update', job_id: jobId, status: 'queued', processed: 0 })
  t.match(first.id, new RegExp(`^${jobId}@`), 'the id names the job and its version')

  const hold = gate()
  startWorker(t, redis, 'batch', uploadDir, { beforeItem: async (i) => { if (i === 2) await hold.promise } })
  await stream.waitFor(e => e.data?.processed === 2)
  hold.open()
  const final = await stream.waitFor(e => e.data?.status === 'succeeded')
  t.match(final.data, { processed: 5, total: 5, result: { lines: 5 } })
  const close = await stream.waitFor(e => e.event === 'close')
  t.same(close, { id: SSE_DONE_ID, event: 'close', data: { code: 1000, reason: 'job finished' } })
  await stream.ended
  const updates = stream.events.filter(e => e.event === 'job_update')
  t.ok(updates.every(e => typeof e.id === 'string' && e.id.startsWith(`${jobId}@`)), 'every update has an id')
  t.equal(new Set(updates.map(e => e.id)).size, updates.length, 'ids differ from state to state')
  t.equal(app.jobProgress.stats().sockets, 0, 'the session is gone')

  // A browser's EventSource reconnects after the end by itself, with the last id: stopped with 204.
  const again = await sse(t, `${url}/batch/${jobId}/events`, { cookie: up.cookie, 'last-event-id': SSE_DONE_ID })
  t.equal(again.status, 204)
  // Any other id (a stream cut before the end): the current state, i.e. the final one, at once.
  const resumed = await sse(t, `${url}/batch/${jobId}/events`, { cookie: up.cookie, 'last-event-id': first.id })
  t.match((await resumed.waitFor(e => e.event === 'job_update')).data, { status: 'succeeded', result: { lines: 5 } })
  await resumed.ended
})

t.test('refusals are plain statuses before any stream: 401 without credentials, 404 alike for missing and foreign jobs', async (t) => {
  const redis = await redisFor(t)
  const { url } = await startApp(t, redis)
  const mine = await upload(`${url}/batch/upload`, lines(1))
  const theirs = await upload(`${url}/batch/upload`, lines(1))
  const anonymous = await sse(t, `${url}/batch/${mine.body.job_id}/events`)
  t.equal(anonymous.status, 401)
  await anonymous.ended
  t.match(JSON.parse(anonymous.body), { code: 4001, message: /authentication required/ })
  const foreign = await sse(t, `${url}/batch/${theirs.body.job_id}/events`, { cookie: mine.cookie })
  const missing = await sse(t, `${url}/batch/00000000-0000-4000-8000-000000000000/events`, { cookie: mine.cookie })
  await Promise.all([foreign.ended, missing.ended])
  t.equal(foreign.status, 404)
  t.equal(missing.status, 404)
  t.equal(foreign.body, missing.body, 'a foreign job and a missing one look alike')
})

t.test('multiplexed: several jobs on one stream, errors for the others, ends when all ended; limits', async (t) => {
  const redis = await redisFor(t)
  const { url, uploadDir } = await startApp(t, redis, { maxSubscriptionsPerConnection: 3 })
  const a = await upload(`${url}/batch/upload`, lines(2))
  const cookie = a.cookie
  const b = await upload(`${url}/dataset/upload`, lines(3), { cookie })
  const theirs = await upload(`${url}/batch/upload`, lines(1))
  const ids = [a.body.job_id, b.body.job_id, theirs.body.job_id]
  const stream = await sse(t, `${url}/job-progress/events?jobs=${ids.join(',')}`, { cookie })
  t.equal(stream.status, 200)
  const denied = await stream.waitFor(e => e.event === 'error')
  t.same(denied.data, { message: `Job not found or access denied: ${theirs.body.job_id}`, job_id: theirs.body.job_id })
  await stream.waitFor(e => e.data?.job_id === a.body.job_id)
  await stream.waitFor(e => e.data?.job_id === b.body.job_id)
  startWorker(t, redis, 'batch', uploadDir)
  await stream.waitFor(e => e.data?.job_id === a.body.job_id && e.data.status === 'succeeded')
  t.notOk(stream.events.some(e => e.event === 'close'), 'open while the dataset job runs')
  startWorker(t, redis, 'dataset', uploadDir)
  await stream.waitFor(e => e.data?.job_id === b.body.job_id && e.data.status === 'succeeded')
  t.match(await stream.waitFor(e => e.event === 'close'), { id: SSE_DONE_ID, data: { code: 1000 } })
  await stream.ended

  // A fourth id that is surely another one (changing a character of one of them could give the same id back).
  const tooMany = await sse(t, `${url}/job-progress/events?jobs=${[...ids, randomUUID()].join(',')}`, { cookie })
  await tooMany.ended
  t.equal(tooMany.status, 400)
  t.match(JSON.parse(tooMany.body).message, /at most 3 per stream/)
  const none = await sse(t, `${url}/job-progress/events`, { cookie })
  t.equal(none.status, 400)
  t.ok(UUID.test(a.body.job_id))
})

t.test('heartbeat comments; shutdown ends the stream with a 1001 close event that a client retries', async (t) => {
  const redis = await redisFor(t)
  const { url, app } = await startApp(t, redis, { heartbeatIntervalMs: 100 })
  const up = await upload(`${url}/batch/upload`, lines(1))
  const stream = await sse(t, `${url}/job-progress/events?jobs=${up.body.job_id}`, { cookie: up.cookie })
  await stream.waitFor(e => e.event === 'job_update')
  while (stream.comments.length === 0) await new Promise(resolve => stream.res.once('data', resolve))
  t.equal(stream.comments[0], ': heartbeat')
  await app.close()
  const close = await stream.waitFor(e => e.event === 'close')
  t.same(close.data, { code: 1001, reason: 'server shutting down' })
  t.equal(close.id, undefined, 'no done id: the browser reconnects, to another instance')
})

t.test('a reader that stops is cut like a slow socket', async (t) => {
  const redis = await redisFor(t)
  const { url, uploadDir, app } = await startApp(t, redis, { sendTimeoutMs: 500, maxBufferedBytes: 64 * 1024 })
  const { createJobWorker, DiskStorage } = await import('../lib/index')
  const up = await upload(`${url}/batch/upload`, lines(1))
  const stream = await sse(t, `${url}/batch/${up.body.job_id}/events`, { cookie: up.cookie })
  await stream.waitFor(e => e.event === 'job_update')
  stream.res.pause()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async () => ({ text: 'x'.repeat(12 * 1024 * 1024) }))
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  const { eventually } = await import('./helpers/index')
  t.ok(await eventually(() => app.jobProgress.stats().sockets === 0, 15_000), 'the stalled stream was closed')
})

t.test('a paused reader gets conflated progress, monotonic, ending with the final one', async (t) => {
  const redis = await redisFor(t)
  const { url, uploadDir } = await startApp(t, redis, { sendTimeoutMs: 60_000, maxBufferedBytes: 64 * 1024 * 1024 })
  const { createJobWorker, DiskStorage } = await import('../lib/index')
  const big = await upload(`${url}/dataset/upload`, lines(1))
  const busy = await upload(`${url}/batch/upload`, lines(40), { cookie: big.cookie })
  const stream = await sse(t, `${url}/job-progress/events?jobs=${big.body.job_id},${busy.body.job_id}`, { cookie: big.cookie })
  await stream.waitFor(e => e.data?.job_id === busy.body.job_id)
  stream.res.pause()
  // A final message larger than the kernel takes from a stopped reader: what follows waits.
  const worker = createJobWorker({ kind: 'dataset', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    await ctx.report(1, 1)
    return { text: 'x'.repeat(12 * 1024 * 1024) }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  await new Promise(resolve => worker.once('completed', resolve))
  const steps = startWorker(t, redis, 'batch', uploadDir, { delayMs: 5 })
  await new Promise(resolve => steps.once('completed', resolve))
  const from = stream.events.length
  stream.res.resume()
  await stream.waitFor(e => e.data?.job_id === busy.body.job_id && e.data.status === 'succeeded', 30_000)
  const updates = stream.events.slice(from).filter(e => e.event === 'job_update' && e.data.job_id === busy.body.job_id)
  t.ok(updates.length < 10, `${updates.length} updates instead of 40`)
  const processed = updates.map(e => e.data.processed as number)
  t.same(processed, [...processed].sort((a, b) => a - b), 'never back')
  t.match(updates.at(-1)?.data, { status: 'succeeded', processed: 40 })
  t.equal(stream.events.find(e => e.data?.job_id === big.body.job_id && e.data.status === 'succeeded')?.data.result.text.length, 12 * 1024 * 1024, 'the stuck final was delivered, not dropped')
})
