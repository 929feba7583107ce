import t from 'tap'
import { Worker } from 'bullmq'
import { createJobWorker, DiskStorage, jobsProtocol } from '../lib/index'
import { DETAIL_LIMITS, detailsDiffer, progressDetails, type Clipped } from '../lib/core/progress-details'
import { connect, gate, lines, redisFor, startApp, upload } from './helpers/index'
import { sse } from './helpers/sse'

const SEED_KEYS = ['eta_seconds', 'job_id', 'processed', 'progress', 'status', 'total']

t.test('progressDetails: one row per case', async (t) => {
  const long = 'm'.repeat(DETAIL_LIMITS.message + 10)
  const rows: Array<[string, unknown, object, Clipped]> = [
    ['a number has none', 42, {}, []],
    ['null', null, {}, []],
    ['an array', [1], {}, []],
    ['counts only', { processed: 1, total: 2 }, {}, []],
    ['all three', { stage: 'parsing', message: 'reading', data: { n: 1 } }, { stage: 'parsing', message: 'reading', data: { n: 1 } }, []],
    ['empty strings are absent', { stage: '', message: '' }, {}, []],
    ['wrong types are absent', { stage: 1, message: {}, data: null }, {}, []],
    ['long stage cut', { stage: 's'.repeat(100) }, { stage: 's'.repeat(DETAIL_LIMITS.stage) }, ['stage']],
    ['long message cut with an ellipsis', { message: long }, { message: `${'m'.repeat(DETAIL_LIMITS.message - 1)}…` }, ['message']],
    ['big data dropped', { data: { x: 'y'.repeat(DETAIL_LIMITS.dataBytes) } }, {}, ['data']]
  ]
  for (const [name, value, expected, clips] of rows) {
    const clipped: Clipped = []
    t.same(progressDetails(value, clipped), expected, name)
    t.same(clipped, clips, `${name}: clipped`)
  }
  t.notOk(detailsDiffer({ data: { a: 1 } }, { data: { a: 1 } }), 'equal data')
  t.ok(detailsDiffer({ data: { a: 1 } }, { data: { a: 2 } }), 'other data')
  t.ok(detailsDiffer({ message: 'a' }, { message: 'b' }), 'other message')
  t.notOk(detailsDiffer({}, {}), 'none')
})

t.test("the plugin's helper: stage, message and data reach the jobs protocol, SSE, and seed 000's formats only with progressDetails", async (t) => {
  const redis = await redisFor(t)
  const detailed = await startApp(t, redis, { progressDetails: true, protocols: [jobsProtocol({ path: '/jobs-ws' })] })
  const exact = await startApp(t, redis, { uploadDir: detailed.uploadDir })
  const up = await upload(`${detailed.url}/batch/upload`, lines(3))
  const jobId: string = up.body.job_id
  const cookie = up.cookie as string

  const mux = connect(t, `${detailed.ws}/jobs-ws`, { cookie })
  await mux.waitFor(m => m.type === 'connected')
  mux.send({ action: 'subscribe', job_id: jobId })
  await mux.waitFor(m => m.type === 'job_update')
  const seedDetailed = connect(t, up.body.ws_url, { cookie })
  const seedExact = connect(t, `${exact.ws}/ws/batch/${jobId}`, { cookie })
  await seedExact.waitFor(m => m.status === 'processing')
  const stream = await sse(t, `${exact.url}/batch/${jobId}/events`, { cookie })

  const warnings: string[] = []
  const steps = [gate(), gate(), gate()]
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(detailed.uploadDir), warn: (m) => warnings.push(m) }, async (ctx) => {
    await ctx.report(0, 3, { stage: 'parsing', message: 'reading the file', data: { bytes: 21 } })
    await steps[0].promise
    await ctx.report(1, 3, { stage: 'checking', message: 'x'.repeat(2000), data: { big: 'y'.repeat(5000) } })
    await steps[1].promise
    // Same counts, a new message only: not dropped as "not newer".
    await ctx.report(1, 3, { stage: 'checking', message: 'checking 1,204 molecules' })
    await steps[2].promise
    await ctx.report(3, 3)
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())

  const first = await mux.waitFor(m => m.stage === 'parsing')
  t.match(first, { type: 'job_update', status: 'running', processed: 0, total: 3, message: 'reading the file', data: { bytes: 21 } })
  t.match((await stream.waitFor(e => e.data?.stage === 'parsing')).data, { message: 'reading the file', data: { bytes: 21 } }, 'SSE carries them')
  t.match(await seedDetailed.waitFor(m => m.stage === 'parsing'), { message: 'reading the file', data: { bytes: 21 } }, 'seed 000 socket with progressDetails')
  const status = await (await fetch(`${detailed.url}/batch/${jobId}/status`, { headers: { cookie } })).json()
  t.match(status, { stage: 'parsing', message: 'reading the file' }, 'status with progressDetails')
  const plain = await (await fetch(`${exact.url}/batch/${jobId}/status`, { headers: { cookie } })).json()
  t.same(Object.keys(plain).sort(), SEED_KEYS, "status without the option: exactly the seed's fields")
  steps[0].open()

  const clipped = await mux.waitFor(m => m.stage === 'checking')
  t.equal(clipped.processed, 1, 'the counts go through')
  t.equal(clipped.message.length, DETAIL_LIMITS.message, 'the message is cut')
  t.notOk('data' in clipped, 'oversized data is dropped')
  t.match(warnings, [/progress message, data over the size limit/], 'the worker says what was cut')
  steps[1].open()
  t.equal((await mux.waitFor(m => m.message === 'checking 1,204 molecules')).processed, 1, 'a new message with the same counts arrives')
  await stream.waitFor(e => e.data?.message === 'checking 1,204 molecules')
  steps[2].open()

  await mux.waitFor(m => m.status === 'succeeded')
  t.equal((await seedExact.closed).code, 1000)
  for (const m of seedExact.messages) t.same(Object.keys(m).sort(), SEED_KEYS.concat('error' in m ? ['error'] : []).sort(), "seed 000 socket without the option: exactly the seed's fields")
  t.ok(seedDetailed.messages.some(m => m.message === 'checking 1,204 molecules'))
})

t.test('a plain BullMQ Worker with job.updateProgress({ processed, total, stage, message, data })', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { protocols: [jobsProtocol({ path: '/jobs-ws' })] })
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const cookie = up.cookie as string
  const mux = connect(t, `${app.ws}/jobs-ws`, { cookie })
  await mux.waitFor(m => m.type === 'connected')
  mux.send({ action: 'subscribe', job_id: up.body.job_id })
  await mux.waitFor(m => m.type === 'job_update')
  const done = gate()
  const worker = new Worker('batch', async (job) => {
    await job.updateProgress({ processed: 1, total: 2, stage: 'plain', message: 'from a plain worker', data: { n: 1 } })
    await done.promise
    return 'ok'
  }, { connection: { url: redis.url }, prefix: 'bull' })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  t.match(await mux.waitFor(m => m.stage === 'plain'), { processed: 1, total: 2, message: 'from a plain worker', data: { n: 1 } })
  // A watcher that subscribes now reads the stage from the job itself.
  const late = connect(t, `${app.ws}/jobs-ws`, { cookie })
  await late.waitFor(m => m.type === 'connected')
  late.send({ action: 'subscribe', job_id: up.body.job_id })
  t.match(await late.waitFor(m => m.type === 'job_update'), { stage: 'plain', message: 'from a plain worker', data: { n: 1 } }, 'the snapshot carries them')
  done.open()
  await mux.waitFor(m => m.status === 'succeeded')
})
