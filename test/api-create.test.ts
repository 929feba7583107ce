import t from 'tap'
import { Type } from '@sinclair/typebox'
import { createJobWorker, DiskStorage, type JobProgressOptions } from '../lib/index'
import { filesIn, jobKeys, lines, redisFor, startApp, startWorker, tempDir, upload, type TestApp } from './helpers/index'
import type { RedisServer } from './helpers/redis'

// Jobs created from JSON and from server code, Idempotency-Key and quotas: two real instances
// behind one Redis, real BullMQ workers.

const KEYS = { 'key-alice': 'alice', 'key-bob': 'bob' }
const alice = { authorization: 'Bearer key-alice' }
const bob = { authorization: 'Bearer key-bob' }

interface Teardown { teardown: (fn: () => unknown) => void }

async function two (t: Teardown, opts: Partial<JobProgressOptions> = {}): Promise<{ redis: RedisServer, a: TestApp, b: TestApp, uploadDir: string }> {
  const redis = await redisFor(t)
  const uploadDir = opts.uploadDir ?? await tempDir(t, 'jp-api-')
  const kinds = {
    batch: { create: { schema: Type.Object({ items: Type.Integer({ minimum: 1, maximum: 1000 }), label: Type.Optional(Type.String()) }, { additionalProperties: false }) } },
    dataset: {}
  }
  const a = await startApp(t, redis, { apiKeys: KEYS, kinds, uploadDir, ...opts })
  const b = await startApp(t, redis, { apiKeys: KEYS, kinds, uploadDir, ...opts })
  return { redis, a, b, uploadDir }
}

async function post (url: string, body: unknown, headers: Record<string, string> = {}): Promise<{ status: number, body: any, headers: Headers }> {
  const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })
  const text = await res.text()
  let parsed: unknown = text
  try { parsed = JSON.parse(text) } catch {}
  return { status: res.status, body: parsed, headers: res.headers }
}

async function status (url: string, headers: Record<string, string>): Promise<{ status: number, body: any }> {
  const res = await fetch(url, { headers })
  return { status: res.status, body: await res.json() }
}

/** A worker of the JSON kind: counts to `data.items`, reports each step, returns what it saw. */
function jsonWorker (t: Teardown, redis: RedisServer, uploadDir: string) {
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, async (ctx) => {
    const items = Number(ctx.data.items)
    for (let i = 1; i <= items; i++) await ctx.report(i, items)
    let text: string | null = null
    if (ctx.file.key !== '') {
      text = ''
      for await (const chunk of ctx.open()) text += String(chunk)
    }
    return { items, label: ctx.data.label ?? null, file: text, hasFile: ctx.file.key !== '' }
  })
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())
  return worker
}

async function finalStatus (url: string, headers: Record<string, string>): Promise<any> {
  for (;;) {
    const s = await status(url, headers)
    if (s.body.status !== 'processing') return s.body
    await new Promise(resolve => setTimeout(resolve, 50))
  }
}

t.test('POST <basePath> with JSON: validated by the kind\'s schema, 202 like an upload, the worker gets ctx.data', async (t) => {
  const { redis, a, b, uploadDir } = await two(t)
  jsonWorker(t, redis, uploadDir)
  const created = await post(`${a.url}/batch`, { data: { items: 4, label: 'x' } }, alice)
  t.equal(created.status, 202)
  t.match(created.body, { job_id: /^[0-9a-f-]{36}$/, status_url: `/batch/${created.body.job_id as string}/status`, ws_url: /\/ws\/batch\// })
  t.match(await finalStatus(`${b.url}${created.body.status_url as string}`, alice), { status: 'complete', processed: 4, total: 4 })
  const result = await status(`${b.url}/batch/${created.body.job_id as string}/result`, alice)
  t.same(result.body.result, { items: 4, label: 'x', file: null, hasFile: false })
  t.equal((await status(`${b.url}${created.body.status_url as string}`, bob)).status, 404, 'another owner: not found')

  t.equal((await post(`${a.url}/batch`, { data: { items: 0 } }, alice)).status, 400, 'schema refuses')
  t.equal((await post(`${a.url}/batch`, { data: { items: 'many' } }, alice)).status, 400)
  t.equal((await post(`${a.url}/batch`, { items: 1 }, alice)).status, 400, 'data is required')
  const ref = await post(`${a.url}/batch`, { data: { items: 1 }, file: { key: 'batch-someone-elses' } }, alice)
  t.equal(ref.status, 400)
  t.equal(ref.body.code, 'FST_JP_INVALID_FILE_REFERENCE', 'no file references without resolveFile')
  const anonymous = await fetch(`${a.url}/batch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ data: { items: 1 } }) })
  t.equal(anonymous.status, 202, 'no credentials: a session starts, as for an upload')
  const cookie = (anonymous.headers.get('set-cookie') ?? '').split(';')[0]
  const anonymousJob = (await anonymous.json()).job_id as string
  t.equal((await fetch(`${b.url}/batch/${anonymousJob}/status`, { headers: { cookie } })).status, 200, 'and owns the job')
  t.equal((await post(`${a.url}/dataset`, { data: {} }, alice)).status, 404, 'no JSON route for a kind without `create`')
  t.same((await jobKeys(redis)).sort(), [`bull:batch:${created.body.job_id as string}`, `bull:batch:${anonymousJob}`].sort(), 'refused requests made no job')
})

t.test('a file reference admitted by resolveFile; enqueue() from server code', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-api-')
  const storage = new DiskStorage(uploadDir)
  const { Readable } = await import('node:stream')
  const stored = await storage.write(Readable.from(['one\ntwo\n']), { kind: 'batch', jobId: '00000000-0000-4000-8000-000000000001', filename: 'in.txt', mimetype: 'text/plain' })
  const a = await startApp(t, redis, {
    apiKeys: KEYS,
    uploadDir,
    kinds: {
      batch: {
        create: {
          resolveFile: (_request, ref, owner) => owner === 'alice' && ref.key === stored.key ? { key: stored.key, name: 'in.txt', size: stored.size, type: 'text/plain' } : null
        }
      }
    }
  })
  jsonWorker(t, redis, uploadDir)
  const byRef = await post(`${a.url}/batch`, { data: { items: 2 }, file: { key: stored.key } }, alice)
  t.equal(byRef.status, 202)
  t.match(await finalStatus(`${a.url}${byRef.body.status_url as string}`, alice), { status: 'complete' })
  t.same((await status(`${a.url}/batch/${byRef.body.job_id as string}/result`, alice)).body.result, { items: 2, label: null, file: 'one\ntwo\n', hasFile: true })
  const refused = await post(`${a.url}/batch`, { data: { items: 2 }, file: { key: stored.key } }, bob)
  t.equal(refused.status, 400, 'refused for another owner')

  const job = await a.app.jobProgress.enqueue('batch', { data: { items: 3 }, owner: 'bob' })
  t.equal(job.created, true)
  t.equal(job.statusUrl, `/batch/${job.jobId}/status`)
  t.match(await finalStatus(`${a.url}${job.statusUrl}`, bob), { status: 'complete', processed: 3 })
  t.equal((await status(`${a.url}${job.statusUrl}`, alice)).status, 404)
  await t.rejects(a.app.jobProgress.enqueue('nope', { data: {}, owner: 'bob' }), /unknown kind/)
  await t.rejects(a.app.jobProgress.enqueue('batch', { data: {}, owner: '' }), { statusCode: 401 })
  const again = await a.app.jobProgress.enqueue('batch', { data: { items: 3 }, owner: 'bob', idempotencyKey: 'k1' })
  const same = await a.app.jobProgress.enqueue('batch', { data: { items: 3 }, owner: 'bob', idempotencyKey: 'k1' })
  t.same([same.jobId, same.created, again.created], [again.jobId, false, true], 'enqueue honours idempotency keys')
})

t.test('Idempotency-Key raced from both instances: one job, every answer names it; another body: 422', async (t) => {
  const { redis, a, b, uploadDir } = await two(t)
  const key = { 'idempotency-key': 'order-42' }
  // JSON: 10 requests at once, half on each instance.
  const answers = await Promise.all(Array.from({ length: 10 }, async (_, i) => await post(`${(i % 2 === 0 ? a : b).url}/batch`, { data: { items: 5 } }, { ...alice, ...key })))
  t.same(answers.map(r => r.status), Array(10).fill(202))
  const ids = new Set(answers.map(r => r.body.job_id))
  t.equal(ids.size, 1, 'every answer names the same job')
  t.same(await jobKeys(redis), [...ids].map(id => `bull:batch:${id as string}`), 'exactly one job in Redis')
  const other = await post(`${b.url}/batch`, { data: { items: 6 } }, { ...alice, ...key })
  t.equal(other.status, 422)
  t.equal(other.body.code, 'FST_JP_IDEMPOTENCY_KEY_REUSED')
  const bobs = await post(`${b.url}/batch`, { data: { items: 5 } }, { ...bob, ...key })
  t.equal(bobs.status, 202)
  t.not(bobs.body.job_id, [...ids][0], 'the same key of another owner is another job')
  t.equal((await post(`${b.url}/batch`, { data: { items: 5 } }, { ...alice, 'idempotency-key': 'bad key with spaces' })).status, 400)

  // Multipart: the same, and the copies of the file the losers stored are removed.
  const before = (await filesIn(uploadDir)).length
  const ups = await Promise.all(Array.from({ length: 8 }, async (_, i) => await upload(`${(i % 2 === 0 ? a : b).url}/dataset/upload`, lines(3), { headers: { ...alice, 'idempotency-key': 'upload-1' } })))
  t.same(ups.map(r => r.status), Array(8).fill(202))
  const upIds = new Set(ups.map(r => r.body.job_id))
  t.equal(upIds.size, 1, 'one job for the raced upload')
  t.same(await jobKeys(redis, 'dataset'), [...upIds].map(id => `bull:dataset:${id as string}`))
  t.equal((await filesIn(uploadDir)).length, before + 1, 'one stored file: the repeated uploads\' copies are gone')
  const changed = await upload(`${a.url}/dataset/upload`, lines(4), { headers: { ...alice, 'idempotency-key': 'upload-1' } })
  t.equal(changed.status, 422, 'another file with the same key')
  t.equal((await filesIn(uploadDir)).length, before + 1, 'and its file is removed')
  startWorker(t, redis, 'dataset', uploadDir)
  t.match(await finalStatus(`${a.url}${ups[0].body.status_url as string}`, alice), { status: 'complete', processed: 3 })
})

t.test('quotas: 50 concurrent uploads of one owner across 2 instances, at most 5 unfinished jobs; 429 with Retry-After', async (t) => {
  const dir = await tempDir(t, 'jp-quota-')
  const disk = new DiskStorage(dir)
  let writes = 0
  // Counts what reaches storage, to tell a refusal from the headers from one after the body.
  const storage = { write: async (...args: Parameters<DiskStorage['write']>) => { writes++; return await disk.write(...args) }, open: (key: string) => disk.open(key), remove: async (key: string) => await disk.remove(key), localPath: (key: string) => disk.localPath(key) }
  const { redis, a, b, uploadDir } = await two(t, { quotas: { maxActiveJobs: 5 }, storage, uploadDir: dir })
  const ups = await Promise.all(Array.from({ length: 50 }, async (_, i) => await upload(`${(i % 2 === 0 ? a : b).url}/dataset/upload`, lines(2), { headers: alice })))
  const accepted = ups.filter(r => r.status === 202)
  const refused = ups.filter(r => r.status === 429)
  t.equal(accepted.length, 5, 'exactly the limit is admitted')
  t.equal(refused.length, 45)
  t.equal(refused[0].body.code, 'FST_JP_QUOTA_EXCEEDED')
  t.equal((await jobKeys(redis, 'dataset')).length, 5, '5 jobs in Redis')
  t.equal((await filesIn(uploadDir)).length, 5, 'refused uploads left no file')
  const res = await fetch(`${a.url}/dataset/upload`, { method: 'POST', body: (() => { const f = new FormData(); f.append('file', new Blob(['x\n']), 'x.txt'); return f })(), headers: alice })
  t.equal(res.status, 429)
  t.equal(res.headers.get('retry-after'), '5')
  t.equal((await upload(`${b.url}/dataset/upload`, lines(1), { headers: bob })).status, 202, 'another owner has its own quota')
  // At the limit, a large upload is refused from its headers: its body is never read.
  const before = writes
  const big = await upload(`${b.url}/dataset/upload`, Buffer.alloc(8 * 1024 * 1024, 'x'), { headers: alice })
  t.equal(big.status, 429)
  t.equal(writes, before, 'refused before its file reached storage')
  t.equal((await filesIn(uploadDir)).length, 6, 'nothing of it was stored')
  // Once the jobs end, their slots are free again.
  startWorker(t, redis, 'dataset', uploadDir)
  for (const up of accepted) await finalStatus(`${a.url}${up.body.status_url as string}`, alice)
  t.equal((await upload(`${a.url}/dataset/upload`, lines(1), { headers: alice })).status, 202, 'admitted again once the jobs ended')
})

t.test('quotas: jobs per window, across instances and both ways of creating a job', async (t) => {
  const { a, b } = await two(t, { quotas: { maxJobsPerWindow: 3, windowMs: 30_000 } })
  const answers = await Promise.all(Array.from({ length: 6 }, async (_, i) => await post(`${(i % 2 === 0 ? a : b).url}/batch`, { data: { items: 1 } }, alice)))
  t.equal(answers.filter(r => r.status === 202).length, 3)
  const refused = answers.filter(r => r.status === 429)
  t.equal(refused.length, 3)
  const wait = Number(refused[0].headers.get('retry-after'))
  t.ok(wait >= 1 && wait <= 30, `Retry-After within the window: ${wait}`)
  t.equal((await upload(`${a.url}/dataset/upload`, lines(1), { headers: alice })).status, 202, 'per kind')
  await t.rejects(a.app.jobProgress.enqueue('batch', { data: { items: 1 }, owner: 'alice' }), { statusCode: 429 })
})

t.test('a request refused after its key was claimed gives the key and the quota slot back', async (t) => {
  const { a } = await two(t, {
    quotas: { maxActiveJobs: 1 },
    webhooks: { secret: 'whsec_' + Buffer.from('a-webhook-secret-of-32-bytes!!!!').toString('base64'), worker: false, lookup: async () => [{ address: '93.184.216.34', family: 4 }] },
    kinds: { batch: {}, dataset: { webhook: { allow: ['hooks.example.com'] } } }
  })
  const headers = { ...alice, 'idempotency-key': 'web-1' }
  const refused = await upload(`${a.url}/dataset/upload`, lines(1), { headers, fields: { webhook_url: 'https://elsewhere.example.org/x' } })
  t.equal(refused.status, 400, 'the webhook check refuses it')
  const retried = await upload(`${a.url}/dataset/upload`, lines(1), { headers, fields: { webhook_url: 'https://hooks.example.com/x' } })
  t.equal(retried.status, 202, 'the same key with a corrected body is a new request, and the slot was free')
  t.equal((await upload(`${a.url}/dataset/upload`, lines(1), { headers: alice })).status, 429, 'the one slot is now taken')
})

t.test('options are checked at registration', async (t) => {
  const { resolveOptions } = await import('../lib/options')
  t.throws(() => resolveOptions({ kinds: { a: {} }, canAccess: 3 }), /`canAccess` must be a function/)
  t.throws(() => resolveOptions({ kinds: { a: { create: { resolveFile: 1 } } } }), /`kinds\.a\.create` must be an object/)
  t.throws(() => resolveOptions({ kinds: { a: { create: null } } }), /`kinds\.a\.create` must be an object/)
  t.throws(() => resolveOptions({ kinds: { a: {} }, quotas: { maxActiveJobs: -1 } }), /quotas\.maxActiveJobs/)
  t.throws(() => resolveOptions({ kinds: { a: {} }, idempotency: { windowSeconds: 0 } }), /idempotency\.windowSeconds/)
  const schema = Type.Object({ n: Type.Integer() })
  t.equal(resolveOptions({ kinds: { a: { create: { schema } } } }).kinds.a.create?.schema, schema, 'the schema is kept as given')
})

t.test('with getOwner, a JSON create without an owner is 401', async (t) => {
  const redis = await redisFor(t)
  const a = await startApp(t, redis, { getOwner: (request) => request.headers['x-user'] as string | undefined, kinds: { batch: { create: {} } } })
  t.equal((await post(`${a.url}/batch`, { data: {} })).status, 401)
  t.equal((await post(`${a.url}/batch`, { data: {} }, { 'x-user': 'u1' })).status, 202)
})
