import t, { type Test } from 'tap'
import Fastify, { type FastifyInstance, type FastifyRequest } from 'fastify'
import fastifyCors from '@fastify/cors'
import fastifyHelmet from '@fastify/helmet'
import fastifyJwt from '@fastify/jwt'
import fastifySecureSession from '@fastify/secure-session'
import fastifyWebsocket from '@fastify/websocket'
import { randomBytes } from 'node:crypto'
import type { Redis } from 'ioredis'
import { errors, jobProgress, jobsProtocol } from '../lib/index'
import { namedRouteError } from '../lib/http/route-claims'
import { connect, lines, redisFor, startApp, startWorker, tempDir, upload, type RedisServer } from './helpers/index'

// An app as it exists before the plugin arrives: its own session (secure-session), JWTs for API
// clients, CORS for its front end, helmet, its own WebSocket route, its own error format and
// hooks, its own Redis connection, and its API under /api. The plugin is registered inside the
// /api prefix and told who the user is through getOwner.

interface Host {
  app: FastifyInstance
  url: string
  ws: string
  hostRedis: Redis
  seen: string[]
}

type SessionLike = { get: (key: string) => unknown, set: (key: string, value: unknown) => void }
const sessionOf = (request: FastifyRequest): SessionLike => (request as unknown as { session: SessionLike }).session

async function hostApp (t: Test, redis: RedisServer): Promise<Host> {
  const uploadDir = await tempDir(t, 'jp-host-uploads-')
  const hostRedis = redis.client()
  t.teardown(() => hostRedis.disconnect())
  const app = Fastify({ logger: false })
  const seen: string[] = []
  app.addHook('onRequest', async (request, reply) => {
    seen.push(request.url)
    reply.header('x-host-hook', 'yes')
  })
  app.setErrorHandler(async (err: Error & { statusCode?: number, code?: string }, _request, reply) => {
    return await reply.code(err.statusCode ?? 500).send({ host_error: { code: err.code, message: err.message } })
  })
  await app.register(fastifyHelmet)
  await app.register(fastifyCors, { origin: ['https://app.example'], credentials: true })
  await app.register(fastifySecureSession, { key: randomBytes(32), cookie: { path: '/', httpOnly: true } })
  await app.register(fastifyJwt, { secret: 'the-host-apps-jwt-secret' })
  await app.register(fastifyWebsocket)
  app.get('/chat', { websocket: true }, (socket) => {
    socket.on('message', (m: Buffer) => socket.send(`echo:${m.toString()}`))
  })
  app.post('/login', async (request) => {
    sessionOf(request).set('user', (request.body as { user: string }).user)
    return { ok: true }
  })

  await app.register(async (api) => {
    api.get('/me', async (request) => ({ user: sessionOf(request).get('user') ?? null }))
    await api.register(jobProgress, {
      connection: hostRedis,
      kinds: { batch: {} },
      uploadDir,
      throttleMs: 0,
      reconcileIntervalMs: 500,
      bridge: { claimIdleMs: 1000, claimIntervalMs: 500 },
      // The host's own identities: the session's user for the browser, the JWT's subject for API
      // clients. Sockets go through the same function (the upgrade request carries both).
      async getOwner (request) {
        const user = sessionOf(request).get('user')
        if (typeof user === 'string') return `user:${user}`
        if (request.headers.authorization !== undefined) {
          try {
            return `user:${(await request.jwtVerify<{ sub: string }>()).sub}`
          } catch {
            return null
          }
        }
        return null
      }
    })
  }, { prefix: '/api' })

  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const { port } = app.server.address() as { port: number }
  startWorker(t, redis, 'batch', uploadDir)
  return { app, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}`, hostRedis, seen }
}

async function login (url: string, user: string): Promise<string> {
  const res = await fetch(`${url}/login`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) })
  const cookie = res.headers.get('set-cookie')
  if (res.status !== 200 || cookie === null) throw new Error(`login failed: ${res.status}`)
  return cookie.split(';')[0]
}

const isFinal = (m: any): boolean => m?.status === 'complete' || m?.status === 'failed'

t.test("the host's session user owns the upload and watches it; others and strangers are refused", async (t) => {
  const redis = await redisFor(t)
  const host = await hostApp(t, redis)
  const alice = await login(host.url, 'alice')
  const bob = await login(host.url, 'bob')

  const up = await upload(`${host.url}/api/batch/upload`, lines(5), { cookie: alice })
  t.equal(up.status, 202)
  t.equal(up.body.status_url, `/api/batch/${up.body.job_id}/status`, 'status_url carries the prefix')
  t.equal(up.body.ws_url, `/api/ws/batch/${up.body.job_id}`, 'ws_url carries the prefix')
  t.equal(up.cookie, alice, 'the plugin sets no cookie of its own')

  const watcher = connect(t, host.ws + up.body.ws_url, { cookie: alice })
  const final = await watcher.waitFor(isFinal)
  t.equal(final.status, 'complete', "alice's socket follows her job to its end")

  const status = await fetch(host.url + up.body.status_url, { headers: { cookie: alice } })
  t.equal(status.status, 200)
  t.equal(status.headers.get('x-content-type-options'), 'nosniff', "helmet's headers are on the plugin's routes")
  t.equal(status.headers.get('x-host-hook'), 'yes', "the host's hooks run on the plugin's routes")
  t.ok(host.seen.includes(up.body.ws_url), "the host's onRequest hook saw the socket's upgrade request")

  const intruder = connect(t, host.ws + up.body.ws_url, { cookie: bob })
  t.equal((await intruder.closed).code, 4003, "bob's socket is refused")
  t.equal((await fetch(host.url + up.body.status_url, { headers: { cookie: bob } })).status, 404, "bob cannot read alice's job")

  const stranger = await upload(`${host.url}/api/batch/upload`, lines(1))
  t.equal(stranger.status, 401, 'no session, no token: 401')
  t.match(stranger.body, { host_error: { code: 'FST_JP_UNAUTHORIZED' } }, "the plugin's errors go through the host's error handler")
  t.equal((await fetch(`${host.url}/api/me`, { headers: { cookie: alice } }).then(async r => await r.json())).user, 'alice', "the host's own routes under the prefix still work")
})

t.test("a JWT client owns its upload, and the same user's browser session sees it", async (t) => {
  const redis = await redisFor(t)
  const host = await hostApp(t, redis)
  const token = host.app.jwt.sign({ sub: 'alice' })
  const up = await upload(`${host.url}/api/batch/upload`, lines(3), { headers: { authorization: `Bearer ${token}` } })
  t.equal(up.status, 202)
  const api = connect(t, host.ws + up.body.ws_url, { headers: { authorization: `Bearer ${token}` } })
  t.equal((await api.waitFor(isFinal)).status, 'complete', 'the token holder watches over a socket')
  const browser = connect(t, host.ws + up.body.ws_url, { cookie: await login(host.url, 'alice') })
  t.equal((await browser.waitFor(isFinal)).status, 'complete', 'alice in the browser sees the same job')
  const forged = await upload(`${host.url}/api/batch/upload`, lines(1), { headers: { authorization: `Bearer ${token.slice(0, -2)}xx` } })
  t.equal(forged.status, 401, 'a forged token is refused')
})

t.test("CORS preflight and headers for the host's front end reach the plugin's routes", async (t) => {
  const redis = await redisFor(t)
  const host = await hostApp(t, redis)
  const preflight = await fetch(`${host.url}/api/batch/upload`, {
    method: 'OPTIONS',
    headers: { origin: 'https://app.example', 'access-control-request-method': 'POST' }
  })
  t.equal(preflight.status, 204)
  t.equal(preflight.headers.get('access-control-allow-origin'), 'https://app.example')
  t.equal(preflight.headers.get('access-control-allow-credentials'), 'true')
  const up = await upload(`${host.url}/api/batch/upload`, lines(1), { cookie: await login(host.url, 'carol'), headers: { origin: 'https://app.example' } })
  t.equal(up.status, 202)
})

t.test("the host's own WebSocket route works next to the plugin's, and close() closes only what the plugin opened", async (t) => {
  const redis = await redisFor(t)
  const host = await hostApp(t, redis)
  const chat = connect(t, `${host.ws}/chat`)
  await chat.opened
  chat.send('hello')
  t.equal(await chat.waitFor(m => m === 'echo:hello'), 'echo:hello', "the host's socket route answers")

  const alice = await login(host.url, 'alice')
  const up = await upload(`${host.url}/api/batch/upload`, lines(200), { cookie: alice })
  const watcher = connect(t, host.ws + up.body.ws_url, { cookie: alice })
  await watcher.opened

  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  await host.hostRedis.client('SETNAME', 'host-app')
  const before = await probe.client('LIST') as string
  t.ok(before.split('\n').filter(Boolean).length > 3, 'the plugin opened connections of its own')

  await host.app.close()
  t.equal((await watcher.closed).code, 1001, "the plugin's sockets close with 1001")
  t.equal(host.hostRedis.status, 'ready', "the host's Redis connection is left open")
  t.equal(await host.hostRedis.ping(), 'PONG', 'and still works')
  const after = (await probe.client('LIST') as string).split('\n').filter(Boolean)
  const names = after.map(line => /name=(\S*)/.exec(line)?.[1] ?? '')
  t.ok(names.includes('host-app'), "the host's connection is still there")
  // Left: the host's connection, the probe and the test worker's connections (not the plugin's).
  const pluginLeft = after.filter(line => /cmd=(xreadgroup|subscribe|ssubscribe)/i.test(line))
  t.same(pluginLeft, [], 'no subscriber or bridge connection of the plugin is left')
})

// The routes an existing app most often owns. The plugin's defaults sit under /job-progress, so an
// app that has all of these registers it with its documented minimal options.
const HOST_ROUTES = ['/health', '/ready', '/metrics', '/events', '/jobs', '/jobs/events']

t.test('an app that already owns /health, /ready, /metrics, /events and /jobs registers the plugin with default options; both serve', async (t) => {
  const redis = await redisFor(t)
  const app = Fastify({ logger: false })
  for (const path of HOST_ROUTES) app.get(path, async () => ({ host: path }))
  await app.register(jobProgress, { connection: redis.url, kinds: { batch: {} }, metrics: true, uploadDir: await tempDir(t, 'jp-host-uploads-'), protocols: [jobsProtocol()] })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const url = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  for (const path of HOST_ROUTES) t.same(await (await fetch(url + path)).json(), { host: path }, `the app still serves ${path}`)

  t.match(await (await fetch(`${url}/job-progress/health`)).json(), { status: 'ok' }, "the plugin's liveness")
  t.equal((await fetch(`${url}/job-progress/ready`)).status, 200, "the plugin's readiness")
  t.match(await (await fetch(`${url}/job-progress/metrics`)).text(), /job_progress_watched_jobs/, "the plugin's metrics")
  t.match(await (await fetch(`${url}/job-progress/events`)).json(), { message: /Name the jobs/ }, "the plugin's multiplexed SSE stream")
  t.equal((await fetch(`${url}/job-progress/jobs`)).status, 401, "the plugin's my-jobs list")
  const up = await upload(`${url}/batch/upload`, lines(1))
  t.equal(up.status, 202, 'the kinds keep their paths')
  t.equal(up.body.ws_url, `/ws/batch/${up.body.job_id}`, 'and the sockets theirs')
})

t.test('ssePath: false and myJobs.path: false leave those routes out; routePrefix moves the rest', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { routePrefix: '/ops', ssePath: false, myJobs: { path: false }, metrics: true, clientRoute: true })
  for (const path of ['/ops/events', '/ops/jobs', '/ops/jobs/events', '/job-progress/health']) t.equal((await fetch(app.url + path)).status, 404, `no ${path}`)
  for (const path of ['/ops/health', '/ops/ready', '/ops/metrics', '/ops/client.js']) t.equal((await fetch(app.url + path)).status, 200, `${path} is served`)
  const root = await startApp(t, redis, { routePrefix: '' })
  t.equal((await fetch(`${root.url}/health`)).status, 200, "routePrefix: '' puts them at the root, as before")
})

t.test("a route the app has at the plugin's path: registration fails naming the option to change, before anything is opened", async (t) => {
  const redis = await redisFor(t)
  const cases: Array<[string, string, Record<string, unknown>]> = [
    ['/job-progress/health', 'health.livePath', {}],
    ['/job-progress/ready', 'health.readyPath', {}],
    ['/job-progress/metrics', 'metrics.path', { metrics: true }],
    ['/job-progress/events', 'ssePath', {}],
    ['/job-progress/jobs', 'myJobs.path', {}],
    ['/job-progress/jobs/events', 'myJobs.path', {}],
    ['/job-progress/client.js', 'clientRoute', { clientRoute: true }],
    ['/ws/jobs', 'protocols[0]', { protocols: [jobsProtocol()] }]
  ]
  const probe = redis.client()
  t.teardown(() => probe.disconnect())
  const clientsBefore = (await probe.client('LIST') as string).split('\n').filter(Boolean).length
  for (const [path, option, opts] of cases) {
    const app = Fastify({ logger: false })
    t.teardown(async () => await app.close())
    app.get(path, async () => ({ host: true }))
    void app.register(async (api) => {
      await api.register(jobProgress, { connection: redis.url, kinds: { batch: {} }, ...opts })
    })
    const err = await app.ready().then(() => null, (err: unknown) => err)
    t.ok(err instanceof errors.RouteTakenError, `${path}: the plugin's error`)
    t.equal((err as { code?: string } | null)?.code, 'FST_JP_ROUTE_TAKEN')
    t.match((err as Error | null)?.message, `the app already has a route GET ${path}; `, `${path}: names the route`)
    t.match((err as Error | null)?.message, `\`${option}\``, `${path}: names ${option}`)
  }
  const upload = Fastify({ logger: false })
  t.teardown(async () => await upload.close())
  upload.post('/batch/upload', async () => ({}))
  await upload.register(jobProgress, { connection: redis.url, kinds: { batch: {} } }).ready().then(() => t.fail('registered'), (err: Error) => {
    t.match(err.message, 'POST /batch/upload; set `kinds.batch.uploadPath`', "a kind's upload path names its option")
  })
  const clientsAfter = (await probe.client('LIST') as string).split('\n').filter(Boolean).length
  t.equal(clientsAfter, clientsBefore, 'no Redis connection was opened')
})

t.test("Fastify's duplicate-route error for a route with parameters is told the option that moves the plugin's", async (t) => {
  const places = [
    { method: 'GET' as const, path: '/batch', advice: 'set `kinds.batch.basePath` to another path', ahead: false },
    { method: 'GET' as const, path: '/ws/batch', advice: 'set `wsPrefix` to another path', ahead: false },
    { method: 'GET' as const, path: '/job-progress/events', advice: 'set `ssePath` to another path' }
  ]
  const duplicate = (method: string, url: string): Error => {
    const app = Fastify()
    app.route({ method: method as 'GET', url: url.replace(':jobId', ':id'), handler: async () => ({}) })
    try {
      app.route({ method: method as 'GET', url, handler: async () => ({}) })
    } catch (err) {
      return err as Error
    }
    throw new Error('no duplicate')
  }
  const rows: Array<[unknown, string, string | null]> = [
    [duplicate('GET', '/batch/:jobId/status'), '', 'GET /batch/:jobId/status; set `kinds.batch.basePath`'],
    [duplicate('GET', '/api/ws/batch/:jobId'), '/api', 'GET /api/ws/batch/:jobId; set `wsPrefix`'],
    [duplicate('GET', '/batches/:jobId'), '', null],
    [new Error('something else'), '', null]
  ]
  for (const [err, prefix, named] of rows) {
    const out = namedRouteError(err, prefix, places)
    if (named === null) t.equal(out, err, 'left as it is')
    else {
      t.ok(out instanceof errors.RouteTakenError)
      t.match((out as Error).message, named)
      t.equal((out as Error).cause, err, "Fastify's error is its cause")
    }
  }
})
