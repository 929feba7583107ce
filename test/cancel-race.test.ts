import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { createJobWorker, DiskStorage, jobsProtocol } from '../lib/index'
import { connect, gate, redisFor, startApp, upload, type Client } from './helpers/index'

// Cancels aimed at the moment a job ends: the cancel answer, every watcher's last message and
// the stored state must agree, and no watcher may see two different final states.

const KEYS = { 'key-alice': 'alice' }
const PATH = '/api/v1/ws/jobs'
const RACES = 200
const BATCH = 10

const FINAL_PROGRESS = new Set(['complete', 'failed', 'cancelled'])
const FINAL_JOBS = new Set(['succeeded', 'failed', 'cancelled'])
const AS_PROGRESS: Record<string, string> = { succeeded: 'complete', failed: 'failed', cancelled: 'cancelled' }

t.test(`${RACES} cancel-vs-complete races: zero inconsistent outcomes`, async (t) => {
  const redis = await redisFor(t)
  // The dashboard sends a subscribe and an unsubscribe per race: 400 messages, faster than the
  // default 50 a second once the machine is quiet. What is tested is the races, not that limit.
  const opts = { apiKeys: KEYS, protocols: [jobsProtocol({ path: PATH })], inbound: { messagesPerSecond: 1000 } }
  const a = await startApp(t, redis, opts)
  const b = await startApp(t, redis, { ...opts, uploadDir: a.uploadDir })

  // Made by whichever side asks first: the worker may start a job before its upload's answer
  // reached the test.
  const gates = new Map<string, { hold: ReturnType<typeof gate>, reported: ReturnType<typeof gate> }>()
  const gatesOf = (jobId: string): { hold: ReturnType<typeof gate>, reported: ReturnType<typeof gate> } => {
    let g = gates.get(jobId)
    if (g === undefined) gates.set(jobId, g = { hold: gate(), reported: gate() })
    return g
  }
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(a.uploadDir), workerOptions: { concurrency: BATCH } }, async (ctx) => {
    await ctx.report(1, 2)
    gatesOf(ctx.job.id as string).reported.open()
    await gatesOf(ctx.job.id as string).hold.promise
    return { done: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())

  // One socket of the plugin's own protocol on instance B watches every job, as a dashboard would.
  const dashboard = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await dashboard.waitFor(m => m.type === 'connected')

  const inconsistent: string[] = []
  const answers = { 202: 0, 409: 0 }
  const race = async (n: number): Promise<void> => {
    const up = await upload(`${a.url}/batch/upload`, `item-${n}\n`, { headers: { authorization: 'Bearer key-alice' } })
    const jobId = up.body.job_id as string
    const watchers: Client[] = [
      connect(t, `${a.ws}/ws/batch/${jobId}?api_key=key-alice`),
      connect(t, `${b.ws}/ws/batch/${jobId}?api_key=key-alice`)
    ]
    dashboard.send({ action: 'subscribe', job_id: jobId })
    await gatesOf(jobId).reported.promise
    await Promise.all(watchers.map(async w => await w.waitFor(m => m.processed === 1)))

    // The job's end and the cancel within 15 ms of each other, either one first (the cancel's own
    // round trips take a few ms, so most offsets send it before the end).
    const jitter = (n % 16) - 14
    const cancel = async (): Promise<number> => {
      const res = await fetch(`${a.url}/batch/${jobId}/cancel`, { method: 'POST', headers: { authorization: 'Bearer key-alice' } })
      await res.arrayBuffer()
      return res.status
    }
    let status: number
    if (jitter >= 0) {
      gatesOf(jobId).hold.open()
      if (jitter > 0) await sleep(jitter)
      status = await cancel()
    } else {
      const pending = cancel()
      await sleep(-jitter)
      gatesOf(jobId).hold.open()
      status = await pending
    }
    if (status === 202 || status === 409) answers[status]++
    const expected = status === 202 ? 'cancelled' : 'complete'

    const lasts = await Promise.all(watchers.map(async w => await w.waitFor(m => FINAL_PROGRESS.has(m.status))))
    const closes = await Promise.all(watchers.map(async w => await w.closed))
    const finals = watchers.flatMap(w => w.messages.filter(m => FINAL_PROGRESS.has(m.status)).map(m => m.status as string))
    const dash = await dashboard.waitFor(m => m.type === 'job_update' && m.job_id === jobId && FINAL_JOBS.has(m.status))
    const stored = await (await fetch(`${a.url}/batch/${jobId}/status`, { headers: { authorization: 'Bearer key-alice' } })).json()
    const seen = [...lasts.map(m => m.status as string), ...finals, AS_PROGRESS[dash.status as string], stored.status as string]
    if (![202, 409].includes(status) || seen.some(s => s !== expected) || closes.some(c => c.code !== 1000)) {
      inconsistent.push(`race ${n} (jitter ${jitter}): cancel ${status}, watchers ${JSON.stringify(lasts.map(m => m.status))}, all finals ${JSON.stringify(finals)}, dashboard ${dash.status as string}, stored ${stored.status as string}`)
    }
    dashboard.send({ action: 'unsubscribe', job_id: jobId })
  }

  for (let i = 0; i < RACES; i += BATCH) {
    await Promise.all(Array.from({ length: BATCH }, async (_, j) => await race(i + j)))
  }

  // Every final the dashboard ever got, per job: one state each, never a second different one.
  const byJob = new Map<string, Set<string>>()
  for (const m of dashboard.messages) {
    if (m.type !== 'job_update' || !FINAL_JOBS.has(m.status)) continue
    const states = byJob.get(m.job_id) ?? new Set<string>()
    states.add(m.status)
    byJob.set(m.job_id, states)
  }
  for (const [jobId, states] of byJob) {
    if (states.size > 1) inconsistent.push(`dashboard saw ${[...states].join(' and ')} for ${jobId}`)
  }
  t.equal(byJob.size, RACES, 'the dashboard saw every job end')
  t.same(inconsistent, [], 'zero inconsistent outcomes')
  t.ok(answers[202] > 0 && answers[409] > 0, `both sides won some races (202: ${answers[202]}, 409: ${answers[409]})`)
})
