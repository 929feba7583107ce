import t from 'tap'
import { Queue } from 'bullmq'
import { spawn } from 'node:child_process'
import { randomUUID } from 'node:crypto'
import { existsSync } from 'node:fs'
import { utimes, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { connect, eventually, filesIn, lines, redisFor, startApp, startWorker, tempDir, upload } from './helpers/index'

type T = Parameters<typeof redisFor>[0]

/** Makes a file look `ageMs` old to the sweep. */
async function age (path: string, ageMs: number): Promise<void> {
  const then = new Date(Date.now() - ageMs)
  await utimes(path, then, then)
}

const HOUR = 3_600_000

t.test('retentionMs keeps the upload after the final state, then the sweep removes it', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { files: { retentionMs: 1_500, sweepIntervalMs: 200 } })
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const jobId = up.body.job_id as string
  const file = join(app.uploadDir, `batch-${jobId}`)
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  startWorker(t, redis, 'batch', app.uploadDir)
  await client.waitFor(m => m.status === 'complete')

  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  t.ok(await eventually(async () => await probe.zscore('bull:batch:jp:uploads:due', jobId) !== null), 'the final event scheduled the removal')
  const due = Number(await probe.zscore('bull:batch:jp:uploads:due', jobId))
  const finishedOn = Number(await probe.hget(`bull:batch:${jobId}`, 'finishedOn'))
  t.ok(Math.abs(due - (finishedOn + 1_500)) < 100, `due ${due - finishedOn} ms after the final state`)
  t.ok(existsSync(file), 'still there after the final state')
  let goneAt = 0
  t.ok(await eventually(() => {
    if (existsSync(file)) return false
    goneAt = Date.now()
    return true
  }, 5_000, 20), 'removed once the retention ended')
  t.ok(goneAt >= due, 'not before')
  // The file goes first, then its marker and due entry (a crash between leaves them to the sweep).
  t.ok(await eventually(async () => await probe.exists(`bull:batch:jp:upload:${jobId}`) === 0), 'its marker is gone')
  t.ok(await eventually(async () => await probe.zcard('bull:batch:jp:uploads:due') === 0), 'and its due entry')
})

t.test('the startup sweep removes old .part files and files of unknown jobs, keeps young ones and others\' files', async (t) => {
  const redis = await redisFor(t)
  const dir = await tempDir(t, 'jp-sweep-')
  const oldPart = join(dir, `batch-${randomUUID()}.part`)
  const unknown = join(dir, `batch-${randomUUID()}`)
  const youngPart = join(dir, `batch-${randomUUID()}.part`)
  const foreign = join(dir, 'notes.txt')
  for (const path of [oldPart, unknown, youngPart, foreign]) await writeFile(path, 'x')
  for (const path of [oldPart, unknown, foreign]) await age(path, 2 * HOUR)

  await startApp(t, redis, { uploadDir: dir, files: { orphanAgeMs: HOUR, sweepIntervalMs: 60_000 } })
  t.ok(await eventually(() => !existsSync(oldPart) && !existsSync(unknown)), 'the old .part file (an upload cut off by a crash) and the unknown job\'s file are removed at start')
  t.ok(existsSync(youngPart), 'a .part file younger than orphanAgeMs stays (an upload in progress)')
  t.ok(existsSync(foreign), 'a file the storage did not write stays')
})

t.test('the periodic sweep removes uploads of jobs lost with Redis, keeps those of live jobs', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { files: { orphanAgeMs: HOUR, sweepIntervalMs: 200 } })
  const lost = await upload(`${app.url}/batch/upload`, lines(2))
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  await probe.flushall() // Redis restarted empty: the job and its marker are gone
  const live = await upload(`${app.url}/batch/upload`, lines(2))
  t.equal(live.status, 202)
  // A job removed behind the plugin's back, without an event (an obliterate, a crash between the
  // final state and the cleanup): its marker is still there, the job is not.
  const vanished = await upload(`${app.url}/batch/upload`, lines(2))
  await probe.del(`bull:batch:${vanished.body.job_id as string}`)
  const lostFile = join(app.uploadDir, `batch-${lost.body.job_id as string}`)
  const liveFile = join(app.uploadDir, `batch-${live.body.job_id as string}`)
  const vanishedFile = join(app.uploadDir, `batch-${vanished.body.job_id as string}`)
  for (const file of [lostFile, liveFile, vanishedFile]) await age(file, 2 * HOUR)
  t.ok(await eventually(() => !existsSync(lostFile), 5_000), 'the lost job\'s upload is removed')
  t.ok(await eventually(() => !existsSync(vanishedFile), 5_000), 'the vanished job\'s upload is removed')
  t.equal(await probe.exists(`bull:batch:jp:upload:${vanished.body.job_id as string}`), 0, 'with its marker')
  // One more orphan, made now: once it is gone a whole later sweep has looked at the live file.
  const later = join(app.uploadDir, `batch-${randomUUID()}.part`)
  await writeFile(later, 'x')
  await age(later, 2 * HOUR)
  t.ok(await eventually(() => !existsSync(later), 5_000), 'a later sweep ran')
  t.ok(existsSync(liveFile), 'a queued job\'s upload stays, however old')
})

/** A worker in its own process that takes a job and hangs; resolves once it took one. */
function hangingWorker (t: T, url: string, dir: string) {
  const child = spawn(process.execPath, ['--require', join(__dirname, 'helpers', 'register.cjs'), join(__dirname, 'helpers', 'hanging-worker.ts'), url, dir], { stdio: ['ignore', 'pipe', 'inherit'] })
  t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL') })
  const active = new Promise<string>(resolve => {
    createInterface({ input: child.stdout }).on('line', (line) => { if (line.startsWith('active ')) resolve(line.slice(7)) })
  })
  const kill = async (): Promise<void> => {
    const exited = new Promise(resolve => child.once('exit', resolve))
    child.kill('SIGKILL')
    await exited
  }
  return { active, kill }
}

t.test('a job failed for stalling too often (worker SIGKILLed twice) has its upload removed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const up = await upload(`${app.url}/batch/upload`, lines(2))
  const jobId = up.body.job_id as string
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })

  for (let i = 0; i < 2; i++) {
    const worker = hangingWorker(t, redis.url, app.uploadDir)
    t.equal(await worker.active, jobId, `attempt ${i + 1} started in a worker process`)
    await worker.kill()
  }
  t.same(await filesIn(app.uploadDir), [`batch-${jobId}`], 'the upload survived both kills')
  // A healthy worker finds the job stalled once more than allowed and fails it.
  startWorker(t, redis, 'batch', app.uploadDir, {}, { workerOptions: { lockDuration: 500, stalledInterval: 300, maxStalledCount: 1 } })
  t.match(await client.waitFor(m => m.status === 'failed', 20_000), { status: 'failed', error: 'job stalled more than allowable limit' })
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0), 'its upload is removed once the failure is recorded')
  const queue = new Queue('batch', { connection: { host: '127.0.0.1', port: redis.port } })
  t.teardown(async () => await queue.close())
  t.equal(await queue.getJobState(jobId), 'failed')
})

t.test('an upload refused after it was stored (empty file) leaves neither a file nor a marker', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const res = await upload(`${app.url}/batch/upload`, '')
  t.equal(res.status, 400)
  t.same(await filesIn(app.uploadDir), [])
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  t.same(await probe.keys('bull:batch:jp:upload:*'), [])
})

t.test('the sweep removes output files of jobs that are gone, keeps those of jobs that still exist', async (t) => {
  const redis = await redisFor(t)
  const dir = await tempDir(t, 'jp-sweep-')
  const gone = randomUUID()
  const kept = randomUUID()
  const goneOutput = join(dir, `batch.out.report.csv-${gone}`)
  const keptOutput = join(dir, `batch.out.report.csv-${kept}`)
  for (const path of [goneOutput, keptOutput]) {
    await writeFile(path, 'x')
    await age(path, 2 * HOUR)
  }
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  // A finished job still in Redis: its output stays downloadable.
  await probe.hset(`bull:batch:${kept}`, 'data', '{}', 'finishedOn', String(Date.now()))
  await probe.hset(`bull:batch:jp:outputs:${gone}`, 'report.csv', '{}')

  await startApp(t, redis, { uploadDir: dir, files: { orphanAgeMs: HOUR, sweepIntervalMs: 60_000 } })
  t.ok(await eventually(() => !existsSync(goneOutput)), 'the output of a job that is gone is removed')
  t.ok(await eventually(async () => await probe.exists(`bull:batch:jp:outputs:${gone}`) === 0), 'with its entry')
  t.ok(existsSync(keptOutput), 'the output of a job that still exists stays')
})
