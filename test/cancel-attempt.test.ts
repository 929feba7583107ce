import t from 'tap'
import { jobsProtocol } from '../lib/index'
import { Keys } from '../lib/core/keys'
import { readSnapshots } from '../lib/core/snapshot'
import { parseVersion } from '../lib/wire/version'
import { connect, gate, JOBS_PATH, redisFor, startApp, startWorker, upload } from './helpers/index'

// A job cancelled during its second attempt: the cancel deletes the job hash, which held the
// attempt, so every path that read the job afterwards (the re-read after the relayed
// `cancelled`, a watcher that subscribes later, a snapshot) said attempt 1, and the final's
// version (1.<entry>) was older than the attempt 2 progress a watcher already held.

t.test('a job cancelled in attempt 2 ends with attempt 2 on every path', async (t) => {
  const redis = await redisFor(t)
  const { url, ws, uploadDir } = await startApp(t, redis, {
    defaultJobOptions: { attempts: 2 },
    protocols: [jobsProtocol({ path: JOBS_PATH })]
  })
  const up = await upload(`${url}/batch/upload`, 'a\nb\nc\nd\n')
  const jobId: string = up.body.job_id
  const cookie = up.cookie as string

  const jobs = connect(t, `${ws}${JOBS_PATH}`, { cookie })
  await jobs.waitFor(m => m.type === 'connected')
  jobs.send({ action: 'subscribe', job_id: jobId })
  await jobs.waitFor(m => m.type === 'job_update')

  // Attempt 1 fails after its first report; attempt 2 reports once and waits to be cancelled.
  const held = gate()
  startWorker(t, redis, 'batch', uploadDir, {
    beforeItem: async (i, ctx) => {
      if (ctx.job.attemptsStarted <= 1 && i === 1) throw new Error('first attempt fails')
      if (ctx.job.attemptsStarted >= 2 && i === 1) await held.promise
    }
  })
  t.teardown(() => held.open())
  const running = await jobs.waitFor(m => m.type === 'job_update' && m.status === 'running' && parseVersion(m.version)?.attempt === 2, 10_000)
  t.equal(parseVersion(running.version)?.attempt, 2, 'attempt 2 runs')

  const res = await fetch(`${url}/batch/${jobId}/cancel`, { method: 'POST', headers: { cookie } })
  t.equal(res.status, 202, 'cancelled')
  const final = await jobs.waitFor(m => m.type === 'job_update' && m.status === 'cancelled', 5_000)
  t.equal(parseVersion(final.version)?.attempt, 2, `the relayed final says attempt 2 (${final.version as string})`)

  // A watcher that subscribes after the cancel reads the job: the snapshot says attempt 2 too.
  const later = connect(t, `${ws}${JOBS_PATH}`, { cookie })
  await later.waitFor(m => m.type === 'connected')
  later.send({ action: 'subscribe', job_id: jobId })
  const snap = await later.waitFor(m => m.type === 'job_update' && m.status === 'cancelled', 5_000)
  t.equal(parseVersion(snap.version)?.attempt, 2, `a later subscription's snapshot says attempt 2 (${snap.version as string})`)

  const client = redis.client()
  t.teardown(() => client.disconnect())
  const [read] = await readSnapshots(client, new Keys({ prefix: 'bull', channelPrefix: 'jp' }), [{ kind: 'batch', queue: 'batch', jobId }], false)
  t.equal(read?.event.state, 'cancelled')
  t.equal(read?.event.attempt, 2, 'readSnapshots: attempt 2')
})
