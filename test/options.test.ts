import t from 'tap'
import Fastify from 'fastify'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { errors, jobProgress, type JobProgressOptions } from '../lib/index'
import { resolveOptions } from '../lib/options'
import { connect, jobKeys, lines, redisFor, tempDir, upload, type RedisServer } from './helpers/index'

/** Clients connected to the private Redis, besides the one asking. */
async function clientsOf (redis: RedisServer): Promise<number> {
  const probe = redis.client()
  try {
    const list = await probe.client('LIST') as string
    return list.trim().split('\n').length - 1
  } finally {
    probe.disconnect()
  }
}

/** Registers the plugin with `opts` and returns the error `ready()` rejects with (or null). */
async function registerError (t: Parameters<typeof redisFor>[0], opts: unknown): Promise<Error | null> {
  const app = Fastify({ logger: false })
  t.teardown(async () => await app.close().catch(() => {}))
  app.register(jobProgress, opts as JobProgressOptions)
  try {
    await app.ready()
    return null
  } catch (err) {
    return err as Error
  }
}

t.test('registration fails fast with a clear message naming the bad option', async (t) => {
  const redis = await redisFor(t)
  const base = { connection: redis.url, session: { secret: 'a-test-secret-of-enough-length' } }
  const cases: Array<[string, unknown, RegExp]> = [
    ['no options at all', undefined, /`kinds` expected required property/],
    ['missing kinds', { ...base }, /`kinds` expected required property/],
    ['no kind', { ...base, kinds: {} }, /`kinds` expected object to have at least 1 properties/],
    ['a kind name with a space', { ...base, kinds: { 'bad name': {} } }, /kind name "bad name" is invalid: use letters, digits/],
    ['a kind name with a slash', { ...base, kinds: { 'a/b': {} } }, /kind name "a\/b" is invalid/],
    ['a negative limit', { ...base, kinds: { batch: {} }, limits: { fileSize: -1 } }, /`limits\.fileSize` expected integer to be greater or equal to 1/],
    ['a negative kind limit', { ...base, kinds: { batch: { maxFileSize: -5 } } }, /`kinds\.batch\.maxFileSize` expected integer to be greater or equal to 1/],
    ['getOwner that is not a function', { ...base, kinds: { batch: {} }, getOwner: 'alice' }, /`getOwner` must be a function/],
    ['an unknown option', { ...base, kinds: { batch: {} }, fileSizeLimit: 10 }, /`fileSizeLimit` unexpected property/],
    ['an unknown kind option', { ...base, kinds: { batch: { acept: ['.csv'] } } }, /`kinds\.batch\.acept` unexpected property/],
    ['a path without a leading slash', { ...base, kinds: { batch: { uploadPath: 'upload' } } }, /`kinds\.batch\.uploadPath` expected string to match/],
    ['a short session secret', { ...base, kinds: { batch: {} }, session: { secret: 'short' } }, /`session\.secret` must be a string of at least 16 characters/],
    ['apiKeys with an empty owner', { ...base, kinds: { batch: {} }, apiKeys: { k1: '' } }, /`apiKeys` must be a function or an object mapping each key to its owner/]
  ]
  for (const [name, opts, message] of cases) {
    const err = await registerError(t, opts)
    t.ok(err instanceof errors.InvalidOptionError, `${name}: an InvalidOptionError`)
    t.match(err, { code: 'FST_JP_INVALID_OPTION', message }, name)
    t.match(err?.message, /^fastify-job-progress: /, `${name}: the message says where it comes from`)
  }

  const several = await registerError(t, { ...base, kinds: { batch: {} }, limits: { parts: 0 }, throttleMs: -1 })
  t.match(several?.message, /`limits\.parts`.*; .*`throttleMs`|`throttleMs`.*; .*`limits\.parts`/, 'every bad option is named at once')

  t.equal(await clientsOf(redis), 0, 'bad options are refused before any Redis connection is opened')
})

t.test('two kinds on one queue are refused, and the refusal leaves no connection open', async (t) => {
  const redis = await redisFor(t)
  const err = await registerError(t, {
    connection: redis.url,
    session: { secret: 'a-test-secret-of-enough-length' },
    kinds: { a: { queueName: 'shared' }, b: { queueName: 'shared' } }
  })
  t.ok(err instanceof errors.InvalidOptionError)
  t.match(err?.message, /kinds "a" and "b" use the same queue "shared"/)
  let open = await clientsOf(redis)
  for (let i = 0; i < 40 && open > 0; i++) {
    await new Promise(resolve => setTimeout(resolve, 25))
    open = await clientsOf(redis)
  }
  t.equal(open, 0, 'no Redis connection left behind')
})

t.test('defaults: every default is spelled once and applied', async (t) => {
  const opts = resolveOptions({ kinds: { batch: {} } })
  t.match(opts, {
    connection: 'redis://127.0.0.1:6379',
    prefix: 'bull',
    channelPrefix: 'jp',
    wsPrefix: '/ws',
    uploadDir: join(tmpdir(), 'fastify-job-progress'),
    limits: { fileSize: 100 * 1024 * 1024, fields: 20, fieldSize: 64 * 1024, parts: 30 },
    session: { cookieName: 'jp_session', secure: 'auto', maxAgeSeconds: 7 * 24 * 3600 },
    throttleMs: 100,
    maxPayload: 4096,
    maxSubscriptionsPerConnection: 100,
    maxConnectionsPerOwner: 50,
    bridge: { enabled: true, group: 'jp-bridge' },
    defaultJobOptions: { removeOnComplete: { age: 24 * 3600 }, removeOnFail: { age: 7 * 24 * 3600 } },
    protocols: []
  })
  t.equal(opts.session.secret, undefined, 'no secret is made up at resolve time')
  const fn = async (): Promise<string> => 'x'
  t.equal(resolveOptions({ kinds: { batch: {} }, getOwner: fn }).getOwner, fn, 'a function option is kept as it is')
  const input = { kinds: { batch: {} }, limits: { fileSize: 10 } }
  resolveOptions(input)
  t.same(input, { kinds: { batch: {} }, limits: { fileSize: 10 } }, "the caller's object is not changed")
})

t.test('defaults on a running app: routes, cookie, BullMQ prefix, limits and max payload', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-uploads-')
  const app = Fastify({ logger: false })
  await app.register(jobProgress, { connection: redis.url, kinds: { batch: {} }, uploadDir, session: { secret: 'a-test-secret-of-enough-length' } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const { port } = app.server.address() as { port: number }
  const url = `http://127.0.0.1:${port}`

  const up = await upload(`${url}/batch/upload`, lines(2))
  t.equal(up.status, 202, 'upload at /<kind>/upload')
  t.same(up.body, { job_id: up.body.job_id, status_url: `/batch/${up.body.job_id}/status`, ws_url: `/ws/batch/${up.body.job_id}` }, 'status at /<kind>/:id/status, socket at /ws/<kind>/:id (a path: no publicUrl)')
  t.match(up.cookie, /^jp_session=/, 'the session cookie is jp_session')
  t.same(await jobKeys(redis, 'batch', 'bull'), [`bull:batch:${up.body.job_id}`], "BullMQ's default prefix and the kind as the queue name")
  t.equal(app.jobProgress.storage.constructor.name, 'DiskStorage', 'disk storage by default')

  const fields: Record<string, string> = {}
  for (let i = 0; i < 21; i++) fields[`f${i}`] = 'v'
  const many = await upload(`${url}/batch/upload`, lines(1), { fields, cookie: up.cookie })
  t.equal(many.status, 413)
  t.match(many.body, { message: 'The form has too many fields: at most 20' }, 'the default field limit applies')

  const ok = connect(t, `ws://127.0.0.1:${port}${up.body.ws_url}`, { cookie: up.cookie })
  await ok.waitFor(m => m.job_id === up.body.job_id)
  ok.send('x'.repeat(4096))
  await new Promise(resolve => setTimeout(resolve, 100))
  t.equal(ok.socket.readyState, ok.socket.OPEN, 'a 4096-byte frame is within the default max payload')
  ok.send('x'.repeat(4097))
  t.equal((await ok.closed).code, 1009, 'one byte more closes with 1009')
})
