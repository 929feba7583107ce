import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { connect, eventually, filesIn, gate, jobKeys, lines, redisFor, startApp, startWorker, upload } from './helpers/index'

const SEED_FIELDS = ['eta_seconds', 'job_id', 'processed', 'progress', 'status', 'total']

async function call (method: 'GET' | 'POST', url: string, cookie?: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { method, headers: cookie === undefined ? {} : { cookie } })
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body }
}

t.test("status is exactly seed 000's message, from queued to complete", async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(4))
  const queued = await call('GET', `${app.url}${up.body.status_url}`, up.cookie)
  t.equal(queued.status, 200)
  t.same(Object.keys(queued.body).sort(), SEED_FIELDS, 'exactly the seed fields')
  t.same(queued.body, { job_id: up.body.job_id, status: 'processing', progress: 0, processed: 0, total: 0, eta_seconds: null })

  // Hold the worker after two items to read a status mid-job.
  const reached = gate()
  const release = gate()
  startWorker(t, redis, 'batch', app.uploadDir, {
    async beforeItem (i) {
      if (i === 2) {
        reached.open()
        await release.promise
      }
    }
  })
  await reached.promise
  const mid = await call('GET', `${app.url}${up.body.status_url}`, up.cookie)
  t.same(Object.keys(mid.body).sort(), SEED_FIELDS)
  t.match(mid.body, { job_id: up.body.job_id, status: 'processing', progress: 50, processed: 2, total: 4 })
  t.ok(mid.body.eta_seconds === null || Number.isInteger(mid.body.eta_seconds), 'eta_seconds is whole seconds')
  release.open()

  t.ok(await eventually(async () => (await call('GET', `${app.url}${up.body.status_url}`, up.cookie)).body.status === 'complete'))
  const done = await call('GET', `${app.url}${up.body.status_url}`, up.cookie)
  t.same(done.body, { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 4, total: 4, eta_seconds: 0 })
})

t.test('result: 409 with a clear message before completion, 200 { job_id, result } after', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  const early = await call('GET', `${app.url}/batch/${up.body.job_id}/result`, up.cookie)
  t.equal(early.status, 409)
  t.match(early.body, { code: 'FST_JP_JOB_NOT_COMPLETE', message: 'Job has no result: its status is processing' })

  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  await client.waitFor(m => m.status === 'complete')
  const res = await call('GET', `${app.url}/batch/${up.body.job_id}/result`, up.cookie)
  t.same(res, { status: 200, body: { job_id: up.body.job_id, result: { lines: 3 } } })
})

t.test('cancel a queued job: 202, watcher gets cancelled then 1000, job and upload removed, status says cancelled', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  const jobId = up.body.job_id
  t.equal((await filesIn(app.uploadDir)).length, 1, 'the upload is stored')

  const watcher = connect(t, up.body.ws_url, { cookie: up.cookie })
  await watcher.waitFor(m => m.status === 'processing')
  const res = await call('POST', `${app.url}/batch/${jobId}/cancel`, up.cookie)
  t.same(res, { status: 202, body: { job_id: jobId, status: 'cancelled' } })

  const final = await watcher.waitFor(m => m.status !== 'processing')
  t.match(final, { job_id: jobId, status: 'cancelled' })
  t.same(await watcher.closed, { code: 1000, reason: 'job finished' })

  t.same(await jobKeys(redis, 'batch'), [], 'the job is removed from the queue')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'its upload is removed')
  const status = await call('GET', `${app.url}/batch/${jobId}/status`, up.cookie)
  t.equal(status.status, 200)
  t.match(status.body, { job_id: jobId, status: 'cancelled' })
  const again = await call('POST', `${app.url}/batch/${jobId}/cancel`, up.cookie)
  t.equal(again.status, 409, 'a second cancel is refused')
  t.match(again.body, { message: 'Job cannot be cancelled: its status is already cancelled' })

  // A worker that starts later finds nothing to run.
  let ran = false
  startWorker(t, redis, 'batch', app.uploadDir, { beforeItem () { ran = true } })
  await sleep(200)
  t.notOk(ran, 'the cancelled job never runs')
})

t.test('cancel an active job: the worker stops at its next report and cannot complete, watchers get cancelled', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(6))
  const jobId = up.body.job_id
  const watcher = connect(t, up.body.ws_url, { cookie: up.cookie })
  const second = connect(t, up.body.ws_url, { cookie: up.cookie })

  const items: number[] = []
  const reached = gate()
  const release = gate()
  const worker = startWorker(t, redis, 'batch', app.uploadDir, {
    async beforeItem (i) {
      items.push(i)
      if (i === 2) {
        reached.open()
        await release.promise
      }
    }
  })
  // The job no longer exists once the cancel won: BullMQ cannot record the attempt's end, so the
  // worker reports that as an error instead of a 'failed' job.
  const stopped = new Promise<Error>(resolve => {
    worker.on('failed', (_job, err) => resolve(err))
    worker.on('error', (err) => resolve(err))
  })
  await reached.promise
  await watcher.waitFor(m => m.processed === 2)

  const res = await call('POST', `${app.url}/batch/${jobId}/cancel`, up.cookie)
  t.same(res, { status: 202, body: { job_id: jobId, status: 'cancelled' } })
  for (const client of [watcher, second]) {
    t.match(await client.waitFor(m => m.status !== 'processing'), { job_id: jobId, status: 'cancelled' })
    t.equal((await client.closed).code, 1000)
  }

  release.open()
  const err = await stopped
  t.match(err.message, /Missing key|Missing lock|cancelled/, `the worker's attempt ended without recording anything (${err.message})`)
  t.same(items, [0, 1, 2], 'no item after the report that saw the cancel')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'the upload is removed once the cancel is read from the event stream')
  const status = await call('GET', `${app.url}/batch/${jobId}/status`, up.cookie)
  t.match(status.body, { status: 'cancelled' }, 'it stays cancelled, not failed')
})

t.test('cancel a finished job: 409 naming its status', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  await client.waitFor(m => m.status === 'complete')
  const res = await call('POST', `${app.url}/batch/${up.body.job_id}/cancel`, up.cookie)
  t.equal(res.status, 409)
  t.match(res.body, { code: 'FST_JP_JOB_FINISHED', message: 'Job cannot be cancelled: its status is already complete' })
  const result = await call('GET', `${app.url}/batch/${up.body.job_id}/result`, up.cookie)
  t.equal(result.status, 200, 'the result stands')
})

t.test('a late connect after completion gets the final message at once, then 1000', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  startWorker(t, redis, 'batch', app.uploadDir)
  t.ok(await eventually(async () => (await call('GET', `${app.url}${up.body.status_url}`, up.cookie)).body.status === 'complete'))

  const late = connect(t, up.body.ws_url, { cookie: up.cookie })
  const closed = await late.closed
  t.equal(closed.code, 1000)
  t.same(late.messages, [{ job_id: up.body.job_id, status: 'complete', progress: 100, processed: 3, total: 3, eta_seconds: 0 }], 'one message: the final one')
})

t.test('a record that fails ends the job failed with an error naming the line', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(5, 3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  const final = await client.waitFor(m => m.status !== 'processing')
  t.match(final, { job_id: up.body.job_id, status: 'failed', processed: 2, total: 5, error: 'record on line 3 is FAIL' })
  t.equal((await client.closed).code, 1000)
  const status = await call('GET', `${app.url}${up.body.status_url}`, up.cookie)
  t.match(status.body, { status: 'failed', error: 'record on line 3 is FAIL' })
  const result = await call('GET', `${app.url}/batch/${up.body.job_id}/result`, up.cookie)
  t.equal(result.status, 409)
  t.match(result.body, { message: 'Job has no result: its status is failed' })
  const cancel = await call('POST', `${app.url}/batch/${up.body.job_id}/cancel`, up.cookie)
  t.equal(cancel.status, 409)
})
