import t from 'tap'
import { Worker } from 'bullmq'
import { createJobWorker, DiskStorage } from '../lib/index'
import { gate, lines, redisFor, startApp, upload } from './helpers/index'

async function get (url: string, cookie?: string): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { headers: cookie === undefined ? {} : { cookie } })
  return { status: res.status, body: await res.json() }
}

t.test("the helper's log(): absolute offsets that keepLogs trimming does not shift; from/limit; truncated when lines were trimmed; tokens and ownership", async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { defaultJobOptions: { keepLogs: 3 } })
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  const jobId: string = up.body.job_id
  const cookie = up.cookie as string
  const written = gate<number[]>()
  const release = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(app.uploadDir) }, async (ctx) => {
    const offsets: number[] = []
    for (let i = 0; i < 5; i++) offsets.push(await ctx.log(`line ${i}`))
    written.open(offsets)
    await release.promise
    return {}
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  t.same(await written.promise, [0, 1, 2, 3, 4], 'log() returns each line\'s offset')

  const url = `${app.url}/batch/${jobId}/logs`
  t.same((await get(`${url}?from=0`, cookie)).body, { job_id: jobId, count: 5, logs: ['line 2', 'line 3', 'line 4'], from: 2, next: 5, first: 2, truncated: true }, 'trimmed lines: truncated, resumes at the oldest kept')
  t.same((await get(`${url}?from=3&limit=1`, cookie)).body, { job_id: jobId, count: 5, logs: ['line 3'], from: 3, next: 4, first: 2 }, 'offset 3 is still line 3 after the trim')
  t.same((await get(`${url}?from=5`, cookie)).body.logs, [], 'nothing new yet')
  t.equal((await get(`${url}?from=5`, cookie)).body.next, 5)
  t.equal((await get(`${url}?token=${encodeURIComponent(up.body.watch_token)}`)).status, 200, 'a watch token reads the logs')
  const other = await upload(`${app.url}/batch/upload`, lines(1))
  const theirs = await get(url, other.cookie)
  t.equal(theirs.status, 404, "somebody else's job: not found")
  t.equal((await get(`${url}?limit=5000`, cookie)).status, 400, 'limit over the maximum: 400')
  release.open()
})

t.test('a plain BullMQ Worker with job.log(): served with offsets from the list', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(1))
  const done = gate()
  const worker = new Worker('batch', async (job) => {
    await job.log('plain 0')
    await job.log('plain 1')
    done.open()
    return 'ok'
  }, { connection: { url: redis.url }, prefix: 'bull' })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  await done.promise
  const res = await get(`${app.url}/batch/${up.body.job_id}/logs?from=1`, up.cookie)
  t.same(res.body, { job_id: up.body.job_id, count: 2, logs: ['plain 1'], from: 1, next: 2, first: 0 })
})
