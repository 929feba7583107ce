import t from 'tap'
import { createJobWorker, DiskStorage, jobsProtocol } from '../lib/index'
import { compareVersions } from '../lib/wire/version'
import { connect, eventually, gate, JOBS_PATH, lines, redisFor, startApp, upload } from './helpers/index'
import { sse } from './helpers/sse'

// A job of two stages whose counts start again (parsing 0..5 of 5, then checking 0..3 of 3):
// the version (the stream entry id) orders its states, not the counts, so every watcher sees
// every stage in order, on every transport. Ordered by counts, the second stage was dropped as
// going back (per-job socket, `jobs`, SSE); only polling saw it.

const STEPS: Array<[stage: string, processed: number, total: number]> = [
  ...[0, 1, 2, 3, 4, 5].map(i => ['parsing', i, 5] as [string, number, number]),
  ...[0, 1, 2, 3].map(i => ['checking', i, 3] as [string, number, number])
]

t.test('a second stage whose counts restart is seen in order on the per-job socket, `jobs`, SSE and polling', async (t) => {
  const redis = await redisFor(t)
  const { url, ws, uploadDir } = await startApp(t, redis, { protocols: [jobsProtocol({ path: JOBS_PATH })] })
  const up = await upload(`${url}/batch/upload`, lines(1))
  const jobId: string = up.body.job_id
  const cookie = up.cookie as string

  const perJob = connect(t, `${ws}/ws/batch/${jobId}`, { cookie })
  await perJob.waitFor(m => m.status === 'processing')
  const jobs = connect(t, `${ws}${JOBS_PATH}`, { cookie })
  await jobs.waitFor(m => m.type === 'connected')
  jobs.send({ action: 'subscribe', job_id: jobId })
  await jobs.waitFor(m => m.type === 'job_update')
  const stream = await sse(t, `${url}/job-progress/events?jobs=${jobId}`, { cookie })
  await stream.waitFor(e => e.data?.job_id === jobId)

  const steps = STEPS.map(() => gate())
  const finish = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    for (let k = 0; k < STEPS.length; k++) {
      await steps[k].promise
      await ctx.report(STEPS[k][1], STEPS[k][2], { stage: STEPS[k][0] })
    }
    await finish.promise
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    for (const step of steps) step.open()
    finish.open()
    await worker.close()
  })

  const at = (p: number, n: number) => (m: any): boolean => m?.processed === p && m?.total === n
  for (let k = 0; k < STEPS.length; k++) {
    const [stage, p, n] = STEPS[k]
    steps[k].open()
    // Each step is awaited on every transport before the next is reported: nothing may be conflated.
    await perJob.waitFor(m => m.status === 'processing' && at(p, n)(m), 3_000)
    await jobs.waitFor(m => m.type === 'job_update' && at(p, n)(m), 3_000)
    await stream.waitFor(e => e.data?.job_id === jobId && at(p, n)(e.data), 3_000)
    let polled: any = null
    t.ok(await eventually(async () => {
      polled = await (await fetch(`${url}/batch/${jobId}/status`, { headers: { cookie } })).json()
      return at(p, n)(polled)
    }, 3_000), `polling sees ${stage} ${p}/${n}: ${JSON.stringify(polled)}`)
  }
  finish.open()
  await perJob.waitFor(m => m.status === 'complete')
  await jobs.waitFor(m => m.type === 'job_update' && m.status === 'succeeded')
  await stream.waitFor(e => e.data?.job_id === jobId && e.data.status === 'succeeded')

  const pairs = (ms: any[]): string[] => ms.filter(m => m?.total > 0 && m.status !== 'complete' && m.status !== 'succeeded').map(m => `${m.processed as number}/${m.total as number}`)
  const expected = STEPS.map(([, p, n]) => `${p}/${n}`)
  t.same(pairs(perJob.messages), expected, 'per-job socket: every step of both stages, in order')
  t.same(pairs(jobs.messages.filter(m => m.type === 'job_update')), expected, '`jobs`: every step, in order')
  t.same(pairs(stream.events.filter(e => e.data?.job_id === jobId).map(e => e.data)), expected, 'SSE: every step, in order')
  t.same(Object.keys(perJob.messages.find(m => m.status === 'processing')).sort(), ['eta_seconds', 'job_id', 'processed', 'progress', 'status', 'total'], 'seed 000 format unchanged: no version field')

  // Versions only go up on the transports that carry them, the final's included.
  const versions = jobs.messages.filter(m => m.type === 'job_update').map(m => m.version as string)
  for (let i = 1; i < versions.length; i++) t.ok(compareVersions(versions[i], versions[i - 1]) > 0, `jobs: ${versions[i]} after ${versions[i - 1]}`)
  const ids = stream.events.filter(e => e.data?.job_id === jobId).map(e => e.data.version as string)
  for (let i = 1; i < ids.length; i++) t.ok(compareVersions(ids[i], ids[i - 1]) > 0, `SSE: ${ids[i]} after ${ids[i - 1]}`)
})
