import t from 'tap'
import { Readable } from 'node:stream'
import { createJobWorker, DiskStorage } from '../lib/index'
import { connect, eventually, filesIn, gate, jobKeys, lines, redisFor, startApp, tempDir, upload } from './helpers/index'
import { sse } from './helpers/sse'

// DELETE of a job (running or ended) and the output files a worker attaches: two real instances,
// a real BullMQ worker, real sockets and SSE.

const KEYS = { 'key-alice': 'alice', 'key-bob': 'bob' }
const alice = { authorization: 'Bearer key-alice' }
const bob = { authorization: 'Bearer key-bob' }
const REPORT = 'id,value\n1,one\n2,two\n3,three\n'

interface Teardown { teardown: (fn: () => unknown) => void }

async function setup (t: Teardown, hold?: Promise<void>) {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-out-')
  const a = await startApp(t, redis, { apiKeys: KEYS, uploadDir })
  const b = await startApp(t, redis, { apiKeys: KEYS, uploadDir })
  const reached = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    const items = text.split('\n').filter(Boolean)
    await ctx.putOutput('report.csv', Readable.from([REPORT]), 'text/csv')
    await ctx.job.log('wrote report.csv')
    for (let i = 0; i < items.length; i++) {
      if (i === 1 && hold !== undefined) {
        reached.open()
        await hold
      }
      await ctx.report(i + 1, items.length)
    }
    return { lines: items.length }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  return { redis, a, b, uploadDir, reached, worker }
}

async function until (url: string, headers: Record<string, string>, done: (body: any) => boolean): Promise<any> {
  for (;;) {
    const res = await fetch(url, { headers })
    const body = await res.json()
    if (done(body)) return body
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

t.test('delete during a running job: watchers on both instances get a final message, no file and no key is left', async (t) => {
  const release = gate()
  const { redis, a, b, uploadDir, reached } = await setup(t, release.promise)
  const up = await upload(`${a.url}/batch/upload`, lines(4), { headers: alice })
  t.equal(up.status, 202)
  const jobId: string = up.body.job_id
  await reached.promise
  const ws = connect(t, `${b.ws}/ws/batch/${jobId}?api_key=key-alice`)
  const stream = await sse(t, `${a.url}/batch/${jobId}/events`, alice)
  await ws.waitFor(m => m.processed >= 1)
  t.equal((await fetch(`${b.url}/batch/${jobId}`, { method: 'DELETE', headers: bob })).status, 404, 'another owner cannot delete it')
  t.ok(await eventually(async () => (await filesIn(uploadDir)).length === 2), 'the upload and the output exist before')

  const res = await fetch(`${b.url}/batch/${jobId}`, { method: 'DELETE', headers: alice })
  t.equal(res.status, 200)
  t.same(await res.json(), { job_id: jobId, status: 'deleted' })
  const final = await ws.waitFor(m => m.status !== 'processing')
  t.match(final, { job_id: jobId, status: 'cancelled', error: 'job was removed' }, 'the socket is told the job was removed')
  t.equal((await ws.closed).code, 1000)
  const event = await stream.waitFor(e => e.data?.status === 'cancelled')
  t.match(event.data, { error: 'job was removed' }, 'so is the event stream')
  t.same(await filesIn(uploadDir), [], 'no upload and no output file left')
  release.open()
  t.equal((await fetch(`${a.url}/batch/${jobId}/status`, { headers: alice })).status, 404, 'the job is not found any more')
  t.equal((await fetch(`${a.url}/batch/${jobId}`, { method: 'DELETE', headers: alice })).status, 404, 'a second delete: not found')
  const client = redis.client()
  t.teardown(() => client.disconnect())
  t.ok(await eventually(async () => (await jobKeys(redis)).length === 0), 'no job hash')
  t.same(await client.keys(`bull:batch:*${jobId}*`), [`bull:batch:jp:deleted:${jobId}`], 'only the short-lived deleted mark')
  t.same(await filesIn(uploadDir), [], 'the worker, stopped, left nothing either')
})

t.test('an output file: listed in the result, downloaded whole and by Range, same access rules; logs; delete after the end', async (t) => {
  const { a, b, uploadDir } = await setup(t)
  const up = await upload(`${a.url}/batch/upload`, lines(3), { headers: alice })
  const jobId: string = up.body.job_id
  await until(`${a.url}/batch/${jobId}/status`, alice, body => body.status === 'complete')
  const result = await (await fetch(`${b.url}/batch/${jobId}/result`, { headers: alice })).json()
  t.same(result, { job_id: jobId, result: { lines: 3 }, outputs: [{ name: 'report.csv', size: REPORT.length, type: 'text/csv', url: `/batch/${jobId}/outputs/report.csv` }] })

  const whole = await fetch(`${b.url}${result.outputs[0].url as string}`, { headers: alice })
  t.equal(whole.status, 200)
  t.equal(whole.headers.get('accept-ranges'), 'bytes')
  t.equal(whole.headers.get('content-type'), 'text/csv')
  t.equal(await whole.text(), REPORT)
  const part = await fetch(`${b.url}${result.outputs[0].url as string}`, { headers: { ...alice, range: 'bytes=9-13' } })
  t.equal(part.status, 206)
  t.equal(part.headers.get('content-range'), `bytes 9-13/${REPORT.length}`)
  t.equal(await part.text(), REPORT.slice(9, 14))
  const tail = await fetch(`${a.url}${result.outputs[0].url as string}`, { headers: { ...alice, range: 'bytes=-6' } })
  t.equal(tail.status, 206)
  t.equal(await tail.text(), REPORT.slice(-6))
  const open = await fetch(`${a.url}${result.outputs[0].url as string}`, { headers: { ...alice, range: 'bytes=20-' } })
  t.equal(await open.text(), REPORT.slice(20))
  const outside = await fetch(`${a.url}${result.outputs[0].url as string}`, { headers: { ...alice, range: 'bytes=999-' } })
  t.equal(outside.status, 416)
  t.equal(outside.headers.get('content-range'), `bytes */${REPORT.length}`)
  t.equal((await fetch(`${a.url}${result.outputs[0].url as string}`, { headers: bob })).status, 404, 'another owner: not found')
  t.equal((await fetch(`${a.url}/batch/${jobId}/outputs/nope.csv`, { headers: alice })).status, 404)
  t.equal((await fetch(`${a.url}/batch/${jobId}/outputs/..%2F..%2Fetc`, { headers: alice })).status, 404)

  const logs = await (await fetch(`${a.url}/batch/${jobId}/logs`, { headers: alice })).json()
  t.same(logs, { job_id: jobId, count: 1, logs: ['wrote report.csv'] })
  t.equal((await fetch(`${a.url}/batch/${jobId}/logs`, { headers: bob })).status, 404)

  t.ok(await eventually(async () => (await filesIn(uploadDir)).length === 1), 'the upload went at the end; the output stays')
  t.equal((await fetch(`${b.url}/batch/${jobId}`, { method: 'DELETE', headers: alice })).status, 200)
  t.same(await filesIn(uploadDir), [], 'deleting the ended job removed its output')
  t.equal((await fetch(`${a.url}${result.outputs[0].url as string}`, { headers: alice })).status, 404)
})
