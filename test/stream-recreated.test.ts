import t from 'tap'
import { createJobWorker, DiskStorage, jobsProtocol } from '../lib/index'
import { compareEntryIds, compareVersions, parseVersion } from '../lib/wire/version'
import { connect, eventually, gate, JOBS_PATH, lines, redisFor, startApp, TEST_OPTIONS, upload } from './helpers/index'

// Entry ids that go back (docs/architecture.md, "When entry ids go back"). The queue's event
// stream first hands out ids an hour ahead (as a host whose clock ran ahead would), a watcher holds
// a state with such an id, then the stream is deleted: made again, it would hand out ids of now,
// below the watcher's, and every later progress report would be dropped as stale until the final.
// The bridge raises the stream's last id to the highest it relayed when it makes its group again,
// so the job's later progress still reaches the watcher. Without that, the `3/4` wait times out.

const AHEAD_MS = 3_600_000

for (const ordered of [true, false]) {
  t.test(`a stream made again with lower ids: the watcher still gets later progress and the final (${ordered ? 'ordered relay' : 'relay from Node'})`, async (t) => {
    const redis = await redisFor(t)
    const probe = redis.client()
    t.teardown(() => probe.disconnect())
    const { app, url, ws, uploadDir } = await startApp(t, redis, {
      protocols: [jobsProtocol({ path: JOBS_PATH })],
      bridge: { ...TEST_OPTIONS.bridge, blockMs: 100, ordered }
    })
    const keys = app.jobProgress.keys
    const stream = keys.queueKey('batch', 'events')
    // The clock that made the stream's ids so far was an hour ahead.
    await probe.xadd(stream, `${Date.now() + AHEAD_MS}-0`, 'event', 'clock-ahead')

    const up = await upload(`${url}/batch/upload`, lines(1))
    const jobId: string = up.body.job_id
    const steps = [gate(), gate(), gate()]
    const finish = gate()
    const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
      for (let k = 0; k < steps.length; k++) {
        await steps[k].promise
        await ctx.report(k + 1, 4)
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

    const jobs = connect(t, `${ws}${JOBS_PATH}`, { cookie: up.cookie })
    await jobs.waitFor(m => m.type === 'connected')
    jobs.send({ action: 'subscribe', job_id: jobId })
    await jobs.waitFor(m => m.type === 'job_update')
    steps[0].open()
    await jobs.waitFor(m => m.type === 'job_update' && m.processed === 1, 5_000)
    steps[1].open()
    const held = await jobs.waitFor(m => m.type === 'job_update' && m.processed === 2, 5_000)
    const heldVersion = parseVersion(held.version)
    t.ok(heldVersion !== null && heldVersion.ms > Date.now() + AHEAD_MS / 2, `the watcher holds a version an hour ahead: ${held.version as string}`)
    const heldEntry = (held.version as string).slice((held.version as string).indexOf('.') + 1)

    // The stream is gone (as after Redis came back empty): the bridge finds its group missing.
    const groups = (await probe.xinfo('GROUPS', stream) as unknown[][]).map(g => String(g[1]))
    await probe.del(stream)
    const lastId = async (): Promise<string | null> => {
      try {
        const info = await probe.xinfo('STREAM', stream) as unknown[]
        return String(info[info.indexOf('last-generated-id') + 1])
      } catch {
        return null
      }
    }
    t.ok(await eventually(async () => {
      try {
        const now = (await probe.xinfo('GROUPS', stream) as unknown[][]).map(g => String(g[1]))
        return groups.every(g => now.includes(g))
      } catch {
        return false
      }
    }, 5_000), 'the bridge made its groups again')
    // Given a moment, the stream's last id is back at the highest relayed (no assertion here: the
    // watcher's messages below say whether it worked).
    const raised = await eventually(async () => {
      const last = await lastId()
      return last !== null && compareEntryIds(last, heldEntry) >= 0
    }, 2_000)
    t.comment(`stream last id ${String(await lastId())} (raised: ${String(raised)}), the watcher holds ${heldEntry}`)

    steps[2].open()
    const later = await jobs.waitFor(m => m.type === 'job_update' && m.processed === 3, 3_000)
    t.ok(compareVersions(later.version, held.version) > 0, `later progress sorts above the held state: ${later.version as string} > ${held.version as string}`)
    finish.open()
    const final = await jobs.waitFor(m => m.type === 'job_update' && m.status === 'succeeded', 5_000)
    t.ok(compareVersions(final.version, later.version) > 0, `the final sorts above it: ${final.version as string}`)
    const updates = jobs.messages.filter(m => m.type === 'job_update' && m.status !== 'succeeded').map(m => m.processed as number)
    t.same(updates.filter(p => p > 0), [1, 2, 3], 'every progress step, in order, none twice')
  })
}
