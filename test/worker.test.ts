import t from 'tap'
import { Worker } from 'bullmq'
import { existsSync } from 'node:fs'
import { connect, eventually, filesIn, gate, lines, redisFor, startApp, startWorker, upload, type RedisServer } from './helpers/index'

/** A plain BullMQ worker on the plugin's queue, as any process could run it; closed at teardown. */
function plainWorker (t: Parameters<typeof redisFor>[0], redis: RedisServer, processor: ConstructorParameters<typeof Worker>[1]): Worker {
  const worker = new Worker('batch', processor, { connection: { host: '127.0.0.1', port: redis.port, maxRetriesPerRequest: null } })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  return worker
}

t.test('the upload is removed once the job succeeds', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  let seenDuring = false
  startWorker(t, redis, 'batch', app.uploadDir, {
    beforeItem (_i, ctx) { seenDuring = ctx.path !== null && existsSync(ctx.path) }
  })
  await client.waitFor(m => m.status === 'complete')
  t.ok(seenDuring, 'the processor had the file')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'removed once the job completed (by the plugin, on the final event)')
})

t.test('the upload is kept between attempts and removed after the final failure', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { jobOptions: { attempts: 2 } } } })
  const up = await upload(`${app.url}/batch/upload`, lines(4, 3))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  const atRetry: boolean[] = []
  const worker = startWorker(t, redis, 'batch', app.uploadDir, {
    beforeItem (i, ctx) {
      if (i === 0) atRetry.push(ctx.path !== null && existsSync(ctx.path))
    }
  })
  const failures: number[] = []
  worker.on('failed', (job) => failures.push(job?.attemptsMade ?? -1))
  const final = await client.waitFor(m => m.status !== 'processing')
  t.match(final, { status: 'failed', error: 'record on line 3 is FAIL' })
  t.same(failures, [1, 2], 'two attempts ran')
  t.same(atRetry, [true, true], 'the file was there at the start of each attempt')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'removed after the last attempt failed')
})

t.test('the upload is removed after a failure when there is no retry', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(3, 1))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  t.match(await client.waitFor(m => m.status !== 'processing'), { status: 'failed', error: 'record on line 1 is FAIL' })
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'removed after the failure')
})

t.test('a retry restarts progress visibly: lower processed after the failed attempt, then complete', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { jobOptions: { attempts: 2 } } } })
  const up = await upload(`${app.url}/batch/upload`, lines(5))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  const atRetry: boolean[] = []
  startWorker(t, redis, 'batch', app.uploadDir, {
    beforeItem (i, ctx) {
      if (ctx.job.attemptsMade === 0 && i === 3) throw new Error('the first attempt fails after three items')
      if (ctx.job.attemptsMade === 1 && i === 0) atRetry.push(ctx.path !== null && existsSync(ctx.path))
    }
  })
  const final = await client.waitFor(m => m.status !== 'processing')
  t.same(final, { job_id: up.body.job_id, status: 'complete', progress: 100, processed: 5, total: 5, eta_seconds: 0 })
  t.same(atRetry, [true], 'the upload survived the failed attempt')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'and is removed once the job completed')

  const processed = client.messages.map(m => m.processed as number)
  const peak = processed.indexOf(3)
  t.ok(peak >= 0, 'the watcher saw the first attempt reach 3')
  const restart = processed.findIndex((p, i) => i > peak && p < 3)
  t.ok(restart > peak, `then a lower count as the retry started (saw ${JSON.stringify(processed)})`)
  const second = processed.slice(restart)
  t.same(second, [...second].sort((a, b) => a - b), 'and within the retry it never goes back')
})

t.test('a plain BullMQ worker reporting { processed, total } is relayed to the socket', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(8))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  const hold = gate()
  plainWorker(t, redis, async (job) => {
    await job.updateProgress({ processed: 2, total: 8 })
    await hold.promise
    await job.updateProgress({ processed: 6, total: 8 })
    return { ok: true }
  })
  t.match(await client.waitFor(m => m.processed === 2), { status: 'processing', progress: 25, processed: 2, total: 8 })
  hold.open()
  t.match(await client.waitFor(m => m.processed === 6), { status: 'processing', progress: 75, total: 8 })
  t.match(await client.waitFor(m => m.status === 'complete'), { progress: 100, processed: 8, total: 8 })
  const result = await fetch(`${app.url}/batch/${up.body.job_id}/result`, { headers: { cookie: up.cookie! } })
  t.same(await result.json(), { job_id: up.body.job_id, result: { ok: true } })
})

t.test('a plain BullMQ worker reporting a number is relayed as a percentage', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(m => m.status === 'processing')
  const hold = gate()
  plainWorker(t, redis, async (job) => {
    await job.updateProgress(42)
    await hold.promise
    return 'done'
  })
  const at42 = await client.waitFor(m => m.progress === 42)
  t.match(at42, { status: 'processing', progress: 42, processed: 42, total: 100 })
  hold.open()
  t.match(await client.waitFor(m => m.status === 'complete'), { progress: 100 })
  t.equal((await client.closed).code, 1000)
})
