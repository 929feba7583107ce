import t from 'tap'
import { FlowProducer, Queue, Worker, type Job } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { Keys, OWNER_FIELD } from '../lib/core/keys'
import { readOwner, readSnapshots, writeOwner } from '../lib/core/snapshot'
import { parseVersion } from '../lib/wire/version'
import { redisFor } from './helpers/index'

// Every state a BullMQ job can be in, read by the plugin's O(1) snapshot next to BullMQ's own
// (list-scanning) getState, mapped to the plugin's states.

type Ours = 'queued' | 'active' | 'completed' | 'failed' | 'cancelled' | null
const MAP: Record<string, Ours> = {
  waiting: 'queued',
  prioritized: 'queued',
  delayed: 'queued',
  'waiting-children': 'queued',
  active: 'active',
  completed: 'completed',
  failed: 'failed',
  unknown: null
}

t.test('each BullMQ state, read in O(1), equals job.getState() mapped to ours', async (t) => {
  const server = await redisFor(t)
  const redis = server.client()
  const prefix = `p${randomUUID().slice(0, 8)}`
  const name = 'table'
  const keys = new Keys({ prefix, channelPrefix: 'jp' })
  const queue = new Queue(name, { connection: { host: '127.0.0.1', port: server.port }, prefix })
  const worker = new Worker(name, null, { connection: { host: '127.0.0.1', port: server.port }, prefix, autorun: false, lockDuration: 60_000 })
  const flows = new FlowProducer({ connection: { host: '127.0.0.1', port: server.port }, prefix })
  t.teardown(async () => {
    await worker.close()
    await queue.close()
    await flows.close()
    redis.disconnect()
  })
  const ours = async (jobId: string): Promise<Ours> => {
    const [snapshot] = await readSnapshots(redis, keys, [{ kind: name, queue: name, jobId }], false)
    return snapshot === null ? null : snapshot.event.state
  }
  const theirs = async (job: Job): Promise<Ours> => MAP[await queue.getJobState(job.id as string)]
  const commands = async (): Promise<Record<string, number>> => {
    const info = await redis.info('commandstats')
    const out: Record<string, number> = {}
    for (const m of info.matchAll(/cmdstat_(\w+):calls=(\d+)/g)) out[m[1]] = Number(m[2])
    return out
  }
  const take = async (): Promise<Job> => {
    const job = await worker.getNextJob('token', { block: false })
    if (job === undefined) throw new Error('no job to take')
    return job
  }
  const rows: Array<{ row: string, jobId: string, expect: Ours, bullmq?: Ours }> = []
  const check = async (row: string, job: Job, expect: Ours, bullmqDiffers?: Ours): Promise<void> => {
    const bull = await theirs(job)
    const before = await commands()
    const got = await ours(job.id as string)
    const after = await commands()
    t.equal(got, expect, `${row}: the plugin reports ${String(expect)}`)
    const mapped = bullmqDiffers === undefined ? expect : bullmqDiffers
    t.equal(bull, mapped, `${row}: BullMQ's getState maps to ${String(mapped)}`)
    for (const scan of ['lpos', 'lrange', 'zrange', 'smembers', 'keys', 'scan']) {
      t.equal(after[scan] ?? 0, before[scan] ?? 0, `${row}: no ${scan}`)
    }
    rows.push({ row, jobId: job.id as string, expect })
  }

  // waiting, then paused
  const waiting = await queue.add('w', { owner: 'o' }, { jobId: randomUUID() })
  await check('waiting', waiting, 'queued')
  await queue.pause()
  await check('waiting (queue paused)', waiting, 'queued')
  await queue.resume()
  const prioritized = await queue.add('p', {}, { jobId: randomUUID(), priority: 5 })
  await check('prioritized', prioritized, 'queued')
  const delayed = await queue.add('d', {}, { jobId: randomUUID(), delay: 600_000 })
  await check('delayed', delayed, 'queued')
  const flow = await flows.add({ name: 'parent', queueName: name, data: {}, opts: { jobId: randomUUID() }, children: [{ name: 'child', queueName: `${name}-children`, data: {}, opts: { jobId: randomUUID() } }] })
  await check('waiting-children', flow.job, 'queued')

  // Take the waiting and the prioritized jobs out of the way: the next take gets a fresh one.
  await queue.remove(waiting.id as string)
  await queue.remove(prioritized.id as string)
  const running = await queue.add('a', {}, { jobId: randomUUID(), attempts: 2 })
  const active = await take()
  t.equal(active.id, running.id)
  await check('active (locked)', active, 'active')
  const [activeSnap] = await readSnapshots(redis, keys, [{ kind: name, queue: name, jobId: active.id as string }], false)
  t.equal(activeSnap?.event.attempt, 1, 'first attempt')

  // The lock expired (its worker froze or died) and BullMQ's stall check has not run yet: BullMQ
  // still lists the job as active; the plugin, which reads the lock and not the list, reports
  // it queued for its next attempt, which is what the stall check will make it.
  await redis.del(keys.lock(name, active.id as string))
  await check('lock expired, stall check not yet run', active, 'queued', 'active')
  const [stallSnap] = await readSnapshots(redis, keys, [{ kind: name, queue: name, jobId: active.id as string }], false)
  t.equal(stallSnap?.event.attempt, 2, 'reported as waiting for attempt 2')
  const stalled = worker as unknown as { moveStalledJobsToWait: () => Promise<void> }
  // BullMQ marks active jobs on one check and moves the unlocked ones on the next; each check
  // is throttled by a key of its own, dropped here instead of waiting out the interval.
  for (let i = 0; i < 2; i++) {
    await redis.del(keys.queueKey(name, 'stalled-check'))
    await stalled.moveStalledJobsToWait()
  }
  await check('stalled and re-queued', active, 'queued')

  // Retried after a failure, then failed for good.
  const again = await take()
  t.equal(again.id, running.id, 'the stalled job is taken again')
  await again.moveToFailed(new Error('first attempt broke'), 'token', false)
  await check('retried after a failure', again, 'queued')
  const last = await take()
  await last.moveToFailed(new Error('second attempt broke'), 'token', false)
  await check('failed', last, 'failed')
  const [failedSnap] = await readSnapshots(redis, keys, [{ kind: name, queue: name, jobId: last.id as string }], false)
  // Three attempts started (the stall, the failure, the last one): a stall is not a failure.
  t.match(failedSnap?.event, { state: 'failed', attempt: 3, error: 'second attempt broke' })

  const ok = await queue.add('c', {}, { jobId: randomUUID() })
  const done = await take()
  t.equal(done.id, ok.id)
  await done.moveToCompleted({ lines: 3 }, 'token', false)
  await check('completed', done, 'completed')

  const gone = await queue.add('r', {}, { jobId: randomUUID(), delay: 600_000 })
  await gone.remove()
  await check('removed', gone, null)

  // Cancelled by this plugin: a queued job is removed and its mark (holding the owner) stays.
  const cancelled = await queue.add('x', { owner: 'o' }, { jobId: randomUUID(), delay: 600_000 })
  await redis.set(keys.cancel(name, cancelled.id as string), 'o')
  await cancelled.remove()
  await check('cancelled by this plugin', cancelled, 'cancelled', null)
  t.equal(await readOwner(redis, keys, { kind: name, queue: name, jobId: cancelled.id as string }), 'o', 'the mark answers for the owner')

  t.equal(rows.length, 13, 'every row ran')
})

t.test('owner: its own field, read alone; data.owner for jobs written without it; versions carry the stream id', async (t) => {
  const server = await redisFor(t)
  const redis = server.client()
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const queue = new Queue('own', { connection: { host: '127.0.0.1', port: server.port } })
  t.teardown(async () => {
    await queue.close()
    redis.disconnect()
  })
  const target = (jobId: string) => ({ kind: 'own', queue: 'own', jobId })
  const legacy = await queue.add('l', { owner: 'alice', big: 'x'.repeat(10_000) }, { jobId: randomUUID() })
  t.equal(await readOwner(redis, keys, target(legacy.id as string)), 'alice', 'falls back to data.owner')
  await writeOwner(redis, keys, 'own', legacy.id as string, 'alice')
  t.equal(await redis.hget(keys.job('own', legacy.id as string), OWNER_FIELD), 'alice', 'stored in its own field')
  t.equal(await readOwner(redis, keys, target(legacy.id as string)), 'alice')
  t.equal(await readOwner(redis, keys, target(randomUUID())), null, 'unknown id: null')

  const never = randomUUID()
  await writeOwner(redis, keys, 'own', never, 'bob')
  t.equal(await redis.exists(keys.job('own', never)), 0, 'no hash is made for a job that is already gone')

  const [snap] = await readSnapshots(redis, keys, [target(legacy.id as string)], true)
  const tail = await redis.xrevrange(keys.queueKey('own', 'events'), '+', '-', 'COUNT', 1)
  t.equal(snap?.entryId, tail[0][0], 'the snapshot carries the stream\'s last entry id')
  t.match(parseVersion(snap?.event.version), { attempt: 1 })
  t.equal(snap?.owner, 'alice')
  t.match(snap?.data, { owner: 'alice' }, 'data only when asked for')
  const [bare] = await readSnapshots(redis, keys, [target(legacy.id as string)], false)
  t.equal(bare?.data, null)
  t.same(await readSnapshots(redis, keys, [], false), [])
})
