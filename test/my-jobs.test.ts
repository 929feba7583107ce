import t from 'tap'
import { createHash, randomUUID } from 'node:crypto'
import { connect, eventually, JOBS_PATH, lines, redisFor, startApp, startWorker, twoApps, upload, uploadAs, type TestApp } from './helpers/index'
import { sse } from './helpers/sse'
import { Redis } from 'ioredis'

// My jobs: GET /job-progress/jobs lists the caller's jobs (kind and state filters, newest first, cursor
// pages) from an owner index that drops jobs BullMQ removed; subscribe_mine and GET /job-progress/jobs/events
// deliver the caller's new jobs and their state changes from any instance.

const PATH = JOBS_PATH

async function list (app: TestApp, query: string, auth: Record<string, string> = { authorization: 'Bearer key-alice' }): Promise<{ status: number, body: any }> {
  const res = await fetch(`${app.url}/job-progress/jobs${query}`, { headers: auth })
  return { status: res.status, body: await res.json() }
}

t.test('GET /jobs: the caller\'s jobs, newest first, kind and state filters, cursor pages', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const mine: string[] = []
  for (let i = 0; i < 5; i++) {
    mine.push(await uploadAs(i % 2 === 0 ? a : b, 'key-alice', i === 4 ? 'dataset' : 'batch'))
    // Distinct creation times, so "newest first" has one answer.
    await new Promise(resolve => setTimeout(resolve, 3))
  }
  const theirs = await uploadAs(a, 'key-bob')
  const all = await list(b, '')
  t.equal(all.status, 200)
  t.same(all.body.jobs.map((j: any) => j.job_id), [...mine].reverse(), 'every job of the caller, newest first, from either instance')
  t.notOk(all.body.jobs.some((j: any) => j.job_id === theirs), "nobody else's")
  t.match(all.body.jobs[0], { kind: 'dataset', status: 'queued', progress: 0, created_at: Number })
  t.equal(all.body.next, null, 'one page: no cursor')

  const pages: string[] = []
  let cursor: string | null = null
  do {
    const page = await list(a, `?limit=2${cursor === null ? '' : `&cursor=${cursor}`}`)
    t.ok(page.body.jobs.length <= 2)
    pages.push(...page.body.jobs.map((j: any) => j.job_id))
    cursor = page.body.next
  } while (cursor !== null)
  t.same(pages, [...mine].reverse(), 'pages of 2 cover the list once, in order')

  t.same((await list(a, '?kind=dataset')).body.jobs.map((j: any) => j.job_id), [mine[4]], 'kind filter')
  // One job finished: the state filter sees it.
  startWorker(t, redis, 'dataset', a.uploadDir)
  await eventually(async () => (await list(a, '?state=succeeded')).body.jobs.length === 1)
  t.same((await list(a, '?state=succeeded')).body.jobs.map((j: any) => j.job_id), [mine[4]], 'state filter')
  t.same((await list(a, '?state=queued,running&limit=3')).body.jobs.map((j: any) => j.job_id), [mine[3], mine[2], mine[1]], 'several states')
  t.same((await list(a, '?state=queued&limit=2&kind=batch')).body.jobs.length, 2)

  t.equal((await list(a, '?state=done')).status, 400, 'unknown state: 400')
  t.equal((await list(a, '?kind=nope')).status, 400, 'unknown kind: 400')
  t.equal((await list(a, '?cursor=bm9wZQ')).status, 400, 'a cursor we did not make: 400')
  t.equal((await list(a, '?limit=1000')).status, 400, 'limit over the maximum: 400')
  t.equal((await list(a, '', {})).status, 401, 'no credentials: 401')
  t.equal((await list(a, '?api_key=key-alice', {})).body.jobs.length, 5, 'an API key in the query, as on every route')
  t.same((await list(a, '', { authorization: 'Bearer key-bob' })).body.jobs.map((j: any) => j.job_id), [theirs], 'API keys: each owner sees their own')
})

t.test('jobs BullMQ removed (removeOnComplete, clean) leave the list and are pruned from the index', async (t) => {
  const { redis, a } = await twoApps(t, { defaultJobOptions: { removeOnComplete: true } })
  const done = await uploadAs(a, 'key-alice')
  const worker = startWorker(t, redis, 'batch', a.uploadDir)
  const index = new Redis(redis.url)
  t.teardown(() => index.disconnect())
  await eventually(async () => await index.exists(`bull:batch:${done}`) === 0)
  await worker.close()
  const cleaned = await uploadAs(a, 'key-alice')
  const queue = a.app.jobProgress.queues.get('batch')
  t.same(await queue?.clean(0, 100, 'wait'), [cleaned], 'queue.clean removed a job')
  const waiting = await uploadAs(a, 'key-alice')
  t.equal(await index.zcard('bull:batch:jp:owner:alice'), 3, 'three jobs indexed')
  const page = await list(a, '')
  t.same(page.body.jobs.map((j: any) => j.job_id), [waiting], 'only the job that still exists')
  t.same(await index.zrange('bull:batch:jp:owner:alice', 0, -1), [waiting], 'the removed ones were pruned as they were read')
})

t.test('the index keeps at most maxPerOwner jobs per owner and kind', async (t) => {
  const { redis, a } = await twoApps(t, { myJobs: { maxPerOwner: 2 } })
  const ids = [await uploadAs(a, 'key-alice'), await uploadAs(a, 'key-alice'), await uploadAs(a, 'key-alice')]
  const index = new Redis(redis.url)
  t.teardown(() => index.disconnect())
  t.equal(await index.zcard('bull:batch:jp:owner:alice'), 2)
  t.ok(await index.ttl('bull:batch:jp:owner:alice') > 0, 'the index expires')
  t.notOk((await list(a, '')).body.jobs.some((j: any) => j.job_id === ids[0]), 'the oldest left the list')
})

t.test('subscribe_mine and GET /jobs/events: a job created on one instance and its changes, to the end, on the other; nothing of other owners', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const alice = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await alice.waitFor(m => m.type === 'connected')
  alice.send({ action: 'subscribe_mine' })
  await alice.waitFor(m => m.type === 'subscribed' && m.job_id === 'mine')
  const bob = connect(t, `${b.ws}${PATH}?api_key=key-bob`)
  await bob.waitFor(m => m.type === 'connected')
  bob.send({ action: 'subscribe_mine' })
  await bob.waitFor(m => m.type === 'subscribed')
  const stream = await sse(t, `${b.url}/job-progress/jobs/events?api_key=key-alice`)
  t.equal(stream.status, 200)
  t.same((await stream.waitFor(e => e.event === 'subscribed')).data, { feed: 'mine' }, 'the stream starts once the feed is in effect')

  const jobId = await uploadAs(a, 'key-alice', 'batch', lines(3))
  const created = await alice.waitFor(m => m.type === 'my_job' && m.job_id === jobId)
  t.match(created, { kind: 'batch', status: 'queued', created: true })
  startWorker(t, redis, 'batch', a.uploadDir)
  await alice.waitFor(m => m.type === 'my_job' && m.job_id === jobId && m.status === 'succeeded')
  t.ok(alice.messages.some(m => m.type === 'my_job' && m.job_id === jobId && m.status === 'running'), 'running on the way')
  await stream.waitFor(e => e.event === 'my_job' && e.data.job_id === jobId && e.data.status === 'succeeded')
  t.ok(stream.events.some(e => e.event === 'my_job' && e.data.created === true), 'SSE: created too')
  t.notOk(bob.messages.some(m => m.type === 'my_job'), 'another owner sees nothing')

  alice.send({ action: 'unsubscribe_mine' })
  alice.send({ action: 'ping' })
  await alice.waitFor(m => m.type === 'pong')
  const later = await uploadAs(a, 'key-alice')
  await stream.waitFor(e => e.event === 'my_job' && e.data.job_id === later)
  t.notOk(alice.messages.some(m => m.type === 'my_job' && m.job_id === later), 'unsubscribed: no more')

  const refused = await fetch(`${b.url}/job-progress/jobs/events`)
  t.equal(refused.status, 401, 'no credentials: 401 before the stream starts')
  await refused.body?.cancel()
})

t.test('a change published after a newer one of the same job (two bridges, one slower) is not passed on', async (t) => {
  const { redis, b } = await twoApps(t)
  const alice = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await alice.waitFor(m => m.type === 'connected')
  alice.send({ action: 'subscribe_mine' })
  await alice.waitFor(m => m.type === 'subscribed' && m.job_id === 'mine')
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  const channel = `jp:owner:of:{${createHash('sha256').update('alice').digest('base64url').slice(0, 22)}}`
  const jobId = randomUUID()
  const change = (status: string, version: string): string => JSON.stringify({ type: 'my_job', job_id: jobId, kind: 'batch', status, version, ts: 1 })
  // As two instances' bridges would publish them: the job's end first, its start late.
  await admin.publish(channel, change('succeeded', '1700000000002-0'))
  await admin.publish(channel, change('running', '1700000000001-0'))
  await admin.publish(channel, change('removed', '1700000000003-0'))
  await alice.waitFor(m => m.type === 'my_job' && m.status === 'removed')
  t.same(alice.messages.filter(m => m.type === 'my_job').map(m => m.status), ['succeeded', 'removed'], 'the late, older change is dropped')
})

t.test('unsubscribe_mine right behind subscribe_mine wins: the feed is not left on', async (t) => {
  const { a, b } = await twoApps(t)
  const watcher = await sse(t, `${a.url}/job-progress/jobs/events?api_key=key-alice`)
  await watcher.waitFor(e => e.event === 'subscribed')
  const alice = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await alice.waitFor(m => m.type === 'connected')
  alice.send({ action: 'subscribe_mine' })
  alice.send({ action: 'unsubscribe_mine' })
  alice.send({ action: 'ping' })
  await alice.waitFor(m => m.type === 'pong')
  const jobId = await uploadAs(a, 'key-alice')
  await watcher.waitFor(e => e.event === 'my_job' && e.data.job_id === jobId)
  // The same instance's copy of that message would have reached alice by now.
  const later = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await later.waitFor(m => m.type === 'connected')
  later.send({ action: 'ping' })
  await later.waitFor(m => m.type === 'pong')
  t.notOk(alice.messages.some(m => m.type === 'my_job'), 'no feed after the unsubscribe')
})

t.test('the feed\'s subscription lost and made again: every follower is told to read its list again (my_jobs_resync)', async (t) => {
  const { redis, b } = await twoApps(t)
  const alice = connect(t, `${b.ws}${PATH}?api_key=key-alice`)
  await alice.waitFor(m => m.type === 'connected')
  alice.send({ action: 'subscribe_mine' })
  await alice.waitFor(m => m.type === 'subscribed' && m.job_id === 'mine')
  const stream = await sse(t, `${b.url}/job-progress/jobs/events?api_key=key-alice`)
  await stream.waitFor(e => e.event === 'subscribed')
  const admin = redis.client()
  t.teardown(() => admin.disconnect())
  const clients = await admin.client('LIST') as string
  // The subscribers: changes published while they are away are lost to them.
  for (const line of clients.split('\n').filter(l => /\bsub=[1-9]/.test(l))) await admin.call('CLIENT', 'KILL', 'ID', /\bid=(\d+)/.exec(line)?.[1] as string)
  t.match(await alice.waitFor(m => m.type === 'my_jobs_resync', 10_000), { ts: Number })
  t.match((await stream.waitFor(e => e.event === 'my_jobs_resync', 10_000)).data, { type: 'my_jobs_resync', ts: Number })
  const later = await uploadAs(b, 'key-alice')
  await alice.waitFor(m => m.type === 'my_job' && m.job_id === later)
  t.pass('the feed goes on after the resync')
})

t.test('getOwner: the list and the feed follow the application\'s owner like every other route', async (t) => {
  const redis = await redisFor(t)
  const opts = { getOwner: (request: any) => request.headers['x-user'] ?? null }
  const a = await startApp(t, redis, opts)
  const b = await startApp(t, redis, { ...opts, uploadDir: a.uploadDir })
  const stream = await sse(t, `${b.url}/job-progress/jobs/events`, { 'x-user': 'carol' })
  await stream.waitFor(e => e.event === 'subscribed')
  const up = await upload(`${a.url}/batch/upload`, lines(1), { headers: { 'x-user': 'carol' } })
  await stream.waitFor(e => e.event === 'my_job' && e.data.job_id === up.body.job_id)
  const res = await fetch(`${b.url}/job-progress/jobs`, { headers: { 'x-user': 'carol' } })
  t.same((await res.json()).jobs.map((j: any) => j.job_id), [up.body.job_id])
  const other = await fetch(`${b.url}/job-progress/jobs`, { headers: { 'x-user': 'dave' } })
  t.same((await other.json()).jobs, [])
})

t.test('GET /jobs/events resumes from Last-Event-ID on the instance that numbered it; an id it cannot resume from gets my_jobs_resync', async (t) => {
  const { redis, a, b } = await twoApps(t)
  const url = `${a.url}/job-progress/jobs/events?api_key=key-alice`
  const first = await sse(t, url)
  const subscribed = await first.waitFor(e => e.event === 'subscribed')
  t.match(subscribed.id, /^[\w-]+\.\d+$/, 'subscribed carries an id too')
  const before = await uploadAs(a, 'key-alice')
  const seen = await first.waitFor(e => e.event === 'my_job' && e.data.job_id === before)
  t.ok(seen.id !== undefined && seen.id !== subscribed.id, 'each change has its own id')
  first.close()
  await first.ended

  // While the stream is away, a job is created, and both run to their end; another follower on
  // the same instance shows when the instance has passed it all on.
  const other = await sse(t, url)
  await other.waitFor(e => e.event === 'subscribed')
  const missed = await uploadAs(b, 'key-alice')
  startWorker(t, redis, 'batch', a.uploadDir)
  for (const id of [before, missed]) await other.waitFor(e => e.event === 'my_job' && e.data.job_id === id && e.data.status === 'succeeded')
  const changes = (s: typeof other): string[][] => s.events.filter(e => e.event === 'my_job').map(e => [e.data.job_id, e.data.status])
  const expected = changes(other)
  t.ok(expected.some(([id]) => id === missed), 'changes happened while away')
  other.close()
  await other.ended

  const resumed = await sse(t, url, { 'last-event-id': seen.id })
  for (const id of [before, missed]) await resumed.waitFor(e => e.event === 'my_job' && e.data.job_id === id && e.data.status === 'succeeded')
  t.same(changes(resumed), expected, 'every change missed, in order, once; nothing seen before')
  t.notOk(resumed.events.some(e => e.event === 'my_jobs_resync'), 'resumed: no re-read needed')
  const live = await uploadAs(a, 'key-alice')
  await resumed.waitFor(e => e.event === 'my_job' && e.data.job_id === live)
  t.pass('then live again')

  for (const [name, app, id] of [['another instance', b, seen.id], ['an id of nobody\'s', a, 'nope.12'], ['a number from the future', a, `${(seen.id as string).replace(/\d+$/, '')}999999`]] as const) {
    const stream = await sse(t, `${app.url}/job-progress/jobs/events?api_key=key-alice`, { 'last-event-id': id })
    await stream.waitFor(e => e.event === 'subscribed')
    t.match((await stream.waitFor(e => e.event === 'my_jobs_resync')).data, { type: 'my_jobs_resync', ts: Number }, `${name}: read the list again`)
    stream.close()
  }
})
