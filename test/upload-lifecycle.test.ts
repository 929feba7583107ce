import t from 'tap'
import { Queue } from 'bullmq'
import { existsSync, watch } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { createJobWorker, DiskStorage } from '../lib/index'
import { connect, eventually, filesIn, lines, redisFor, startApp, upload, type RedisServer, type TestApp } from './helpers/index'

type T = Parameters<typeof redisFor>[0]

/**
 * A worker whose lock expires after 1 s and whose stall check runs every second, so a Redis
 * pause longer than that hands every active job to a second attempt while the first still runs.
 * Each attempt reads the upload at its start and again at its end: a file removed while any
 * attempt still needs it fails that attempt with ENOENT.
 *
 * The tests run two such workers, as a deployment would: the first takes all six jobs, the
 * second the second attempts. (Two attempts of one job in the same BullMQ worker share its lock
 * bookkeeping, keyed by job id: the first attempt's end stops the renewal of the second's lock,
 * which then stalls again and again.)
 */
function faultyWorker (t: T, redis: RedisServer, app: TestApp, errors: string[]) {
  const worker = createJobWorker({
    kind: 'batch',
    connection: redis.url,
    storage: new DiskStorage(app.uploadDir),
    workerOptions: { concurrency: 6, lockDuration: 1_000, stalledInterval: 1_000, maxStalledCount: 10 }
  }, async (ctx) => {
    const read = async (): Promise<string[]> => {
      try {
        return (await readFile(ctx.path as string, 'utf8')).split('\n').filter(Boolean)
      } catch (err) {
        errors.push(String((err as Error).message))
        throw err
      }
    }
    const items = await read()
    for (let i = 0; i < items.length; i++) {
      await sleep(150)
      await ctx.report(i + 1, items.length)
    }
    await read()
    return { lines: items.length }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  return worker
}

/** Records when each upload file disappears from the directory. */
function watchRemovals (t: T, dir: string): Map<string, number> {
  const removed = new Map<string, number>()
  const watcher = watch(dir, (_event, name) => {
    if (name === null || name.endsWith('.part')) return
    if (!existsSync(join(dir, name)) && !removed.has(name)) removed.set(name, Date.now())
  })
  t.teardown(() => watcher.close())
  return removed
}

async function uploadSix (t: T, app: TestApp): Promise<Array<{ jobId: string, cookie: string, client: ReturnType<typeof connect> }>> {
  const jobs = []
  for (let i = 0; i < 6; i++) {
    const up = await upload(`${app.url}/batch/upload`, lines(16))
    t.equal(up.status, 202)
    jobs.push({ jobId: up.body.job_id as string, cookie: up.cookie as string, client: connect(t, up.body.ws_url, { cookie: up.cookie }) })
  }
  return jobs
}

t.test('a 5 s Redis pause mid-way through 6 jobs: second attempts find their upload, every job completes', async (t) => {
  const redis = await redisFor(t)
  t.teardown(() => redis.signal('SIGCONT'))
  const app = await startApp(t, redis, { kinds: { batch: { jobOptions: { removeOnComplete: { count: 100 } } } } })
  const jobs = await uploadSix(t, app)
  const removed = watchRemovals(t, app.uploadDir)
  const errors: string[] = []
  const started = new Map<string, number>()
  const first = faultyWorker(t, redis, app, errors)
  first.on('active', (job) => started.set(job.id as string, (started.get(job.id as string) ?? 0) + 1))
  await Promise.all(jobs.map(async j => await j.client.waitFor(m => m.processed >= 2)))
  const second = faultyWorker(t, redis, app, errors)
  second.on('active', (job) => started.set(job.id as string, (started.get(job.id as string) ?? 0) + 1))

  redis.signal('SIGSTOP')
  await sleep(5_000)
  redis.signal('SIGCONT')

  for (const j of jobs) {
    const final = await j.client.waitFor(m => m.status !== 'processing' && m.status !== 'pending', 30_000)
    t.match(final, { status: 'complete', processed: 16, total: 16 }, `job ${j.jobId} completed`)
  }
  t.same(errors, [], 'no attempt lost its upload (no ENOENT)')
  t.ok([...started.values()].some(n => n >= 2), `the lock expired and second attempts ran (${JSON.stringify([...started.values()])})`)

  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0, 10_000), 'every upload removed once its job ended')
  const queue = new Queue('batch', { connection: { host: '127.0.0.1', port: redis.port } })
  t.teardown(async () => await queue.close())
  for (const j of jobs) {
    const job = await queue.getJob(j.jobId)
    const at = removed.get(`batch-${j.jobId}`)
    t.ok(job?.finishedOn !== undefined && at !== undefined && at >= job.finishedOn, `job ${j.jobId}: file removed (${at}) after the final state was recorded (${job?.finishedOn})`)
  }
  const client = redis.client()
  t.teardown(() => client.disconnect())
  t.same(await client.keys('bull:batch:jp:upload:*'), [], 'no upload marker left')
})

t.test('Redis SIGKILLed and restarted from its AOF mid-way: every upload processed, data-less final events still clean up', async (t) => {
  const redis = await redisFor(t)
  // The job's data (and the file key in it) is gone when the final event is read.
  const app = await startApp(t, redis, { kinds: { batch: { jobOptions: { removeOnComplete: true } } } })
  const jobs = await uploadSix(t, app)
  const errors: string[] = []
  const completed = new Set<string>()
  const first = faultyWorker(t, redis, app, errors)
  first.on('completed', (job) => completed.add(job.id as string))
  await Promise.all(jobs.map(async j => await j.client.waitFor(m => m.processed >= 2)))
  const second = faultyWorker(t, redis, app, errors)
  second.on('completed', (job) => completed.add(job.id as string))

  await redis.kill()
  await sleep(2_000)
  await redis.up()

  t.ok(await eventually(() => completed.size === 6, 30_000, 100), `every job completed (${completed.size} of 6)`)
  t.same(errors, [], 'no attempt lost its upload (no ENOENT)')
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0, 10_000), 'every upload removed once its job ended')
  const client = redis.client()
  t.teardown(() => client.disconnect())
  t.same(await client.keys('bull:batch:jp:upload:*'), [], 'no upload marker left')
  t.equal(await client.zcard('bull:batch:completed'), 0, 'jobs were removed on completion')
})
