import t from 'tap'
import { Readable } from 'node:stream'
import { createJobWorker, DiskStorage, jobsProtocol, type CanAccess } from '../lib/index'
import { connect, gate, redisFor, startApp, tempDir, upload } from './helpers/index'
import { sse } from './helpers/sse'

// The access policy (`canAccess`): a team shares its jobs. Every route, socket and stream admits
// a team member and answers anyone else exactly as for a missing job. Two real instances.

const KEYS = { 'key-alice': 'alice', 'key-bob': 'bob', 'key-carol': 'carol', 'key-dave': 'dave', 'key-eve': 'eve' }
const TEAM: Record<string, string> = { alice: 'red', bob: 'red', carol: 'blue' }
const as = (who: string): Record<string, string> => ({ authorization: `Bearer key-${who}` })
const JOBS = '/api/v1/ws/jobs'

// A team shares everything; dave may only read statuses; eve's lookups fail (a policy that throws).
const canAccess: CanAccess = (_request, job, action, requester) => {
  if (requester === 'eve') throw new Error('directory unavailable')
  if (requester === 'dave') return action === 'status'
  return TEAM[requester] !== undefined && TEAM[requester] === TEAM[job.owner]
}

t.test('a team member gets every route and socket; others get the not-found answer', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-access-')
  const opts = { apiKeys: KEYS, uploadDir, canAccess, protocols: [jobsProtocol({ path: JOBS })] }
  const a = await startApp(t, redis, opts)
  const b = await startApp(t, redis, opts)
  const hold = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    if (text.startsWith('HOLD')) {
      await ctx.report(1, 2)
      await hold.promise
      await ctx.report(2, 2)
    }
    await ctx.putOutput('out.txt', Readable.from(['output']))
    await ctx.job.log('done')
    return { text }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  t.teardown(() => hold.open())

  const done = (await upload(`${a.url}/batch/upload`, 'quick\n', { headers: as('alice') })).body.job_id as string
  const running = (await upload(`${a.url}/batch/upload`, 'HOLD\n', { headers: as('alice') })).body.job_id as string
  const missing = '00000000-0000-4000-8000-00000000beef'
  for (;;) {
    const s = await (await fetch(`${a.url}/batch/${done}/status`, { headers: as('alice') })).json()
    if (s.status === 'complete') break
    await new Promise(resolve => setTimeout(resolve, 50))
  }

  const routes = (id: string): Array<[string, string]> => [
    ['GET', `/batch/${id}/status`], ['GET', `/batch/${id}/result`], ['GET', `/batch/${id}/logs`], ['GET', `/batch/${id}/outputs/out.txt`]
  ]
  const call = async (base: string, method: string, path: string, who: string): Promise<{ status: number, body: string }> => {
    const res = await fetch(base + path, { method, headers: as(who) })
    return { status: res.status, body: await res.text() }
  }
  for (const [method, path] of routes(done)) {
    t.equal((await call(b.url, method, path, 'bob')).status, 200, `bob (team): ${method} ${path.replace(done, ':id')}`)
    const notFound = await call(b.url, method, path.replace(done, missing), 'carol')
    for (const who of ['carol', 'eve']) {
      const refused = await call(b.url, method, path, who)
      t.equal(refused.status, 404, `${who}: ${method} ${path.replace(done, ':id')}`)
      t.equal(refused.body, notFound.body, 'the same answer as a missing job')
    }
  }
  t.equal((await call(a.url, 'GET', `/batch/${done}/status`, 'dave')).status, 200, 'dave may read the status')
  t.equal((await call(a.url, 'GET', `/batch/${done}/result`, 'dave')).status, 404, 'and nothing else')

  // Sockets and streams: the seed-000 socket, the jobs protocol, SSE per job and multiplexed.
  const ws = connect(t, `${b.ws}/ws/batch/${running}?api_key=key-bob`)
  await ws.waitFor(m => m.processed === 1)
  const foreign = connect(t, `${b.ws}/ws/batch/${running}?api_key=key-carol`)
  t.equal((await foreign.closed).code, 4003, 'carol: the socket is refused as for a missing job')
  const multi = connect(t, `${a.ws}${JOBS}?api_key=key-bob`)
  await multi.waitFor(m => m.type === 'connected')
  multi.send({ action: 'subscribe', job_id: running })
  await multi.waitFor(m => m.type === 'job_update' && m.job_id === running && m.processed === 1)
  const other = connect(t, `${a.ws}${JOBS}?api_key=key-carol`)
  await other.waitFor(m => m.type === 'connected')
  other.send({ action: 'subscribe', job_id: running })
  other.send({ action: 'subscribe', job_id: missing })
  const errors = [await other.waitFor(m => m.type === 'error' && m.job_id === running), await other.waitFor(m => m.type === 'error' && m.job_id === missing)]
  t.equal(errors[0].message.replace(running, 'ID'), errors[1].message.replace(missing, 'ID'), 'the jobs protocol refuses carol as for a missing job')
  t.notOk(other.messages.some(m => m.type === 'job_update'), 'and sends her nothing of the job')
  const stream = await sse(t, `${b.url}/batch/${running}/events`, as('bob'))
  t.equal(stream.status, 200)
  await stream.waitFor(e => e.data?.processed === 1)
  t.equal((await sse(t, `${b.url}/batch/${running}/events`, as('carol'))).status, 404, 'carol: SSE 404')
  const muxed = await sse(t, `${a.url}/job-progress/events?jobs=${running}`, as('bob'))
  await muxed.waitFor(e => e.data?.job_id === running && e.data?.processed === 1)

  t.equal((await call(a.url, 'POST', `/batch/${running}/cancel`, 'carol')).status, 404, 'carol cannot cancel')
  t.equal((await call(a.url, 'DELETE', `/batch/${running}`, 'carol')).status, 404, 'nor delete')
  t.equal((await call(a.url, 'POST', `/batch/${running}/cancel`, 'dave')).status, 404, 'nor dave')
  t.equal((await call(b.url, 'POST', `/batch/${running}/cancel`, 'bob')).status, 202, 'bob cancels the team\'s job')
  t.match(await ws.waitFor(m => m.status === 'cancelled'), { job_id: running })
  await multi.waitFor(m => m.type === 'job_update' && m.job_id === running && m.status === 'cancelled')
  await stream.waitFor(e => e.data?.status === 'cancelled')
  t.equal((await call(b.url, 'DELETE', `/batch/${done}`, 'bob')).status, 200, 'and deletes one')
})
