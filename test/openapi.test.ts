import t from 'tap'
import fastifySwagger from '@fastify/swagger'
import { Type } from '@sinclair/typebox'
import { jobsProtocol } from '../lib/index'
import { redisFor, startApp } from './helpers/index'

// With @fastify/swagger registered first, the generated OpenAPI document lists every route of
// the plugin with its request and response schemas.

t.test('the OpenAPI document lists the routes with their schemas', async (t) => {
  const redis = await redisFor(t)
  interface Route { method: string | string[], url: string, schema?: { response?: Record<string, unknown>, hide?: boolean }, websocket?: boolean }
  const routes: Route[] = []
  const { app } = await startApp(t, redis, {
    apiKeys: { k: 'alice' },
    protocols: [jobsProtocol({ path: '/ws/jobs' })],
    metrics: true,
    clientRoute: true,
    webhooks: { secret: 'whsec_' + Buffer.from('a-webhook-secret-of-32-bytes!!!!').toString('base64'), worker: false, authorize: () => true },
    kinds: { batch: { accept: ['text/csv'], create: { schema: Type.Object({ rows: Type.Integer({ minimum: 1 }) }) } }, dataset: { webhook: { url: 'https://hooks.example.com/jobs' } } }
  }, async (app) => {
    app.addHook('onRoute', (route) => { routes.push(route as Route) })
    await app.register(fastifySwagger, { openapi: { info: { title: 'test', version: '1.0.0' } } })
  })
  const doc = app.swagger() as any
  const paths = doc.paths as Record<string, Record<string, any>>
  const op = (path: string, method: string): any => {
    const found = paths[path]?.[method]
    t.ok(found, `${method.toUpperCase()} ${path} is documented`)
    return found ?? {}
  }
  for (const kind of ['batch', 'dataset']) {
    const upload = op(`/${kind}/upload`, 'post')
    t.ok(upload.requestBody.content['multipart/form-data'].schema.properties.file, 'upload: the file part')
    t.same(upload.requestBody.content['multipart/form-data'].schema.required, ['file'])
    t.same(Object.keys(upload.responses['202'].content['application/json'].schema.properties).sort(), ['job_id', 'status_url', 'watch_token', 'ws_url'])
    t.ok(upload.responses['429'] && upload.responses['413'] && upload.responses['415'], 'upload: its errors')
    t.ok(upload.parameters.some((p: any) => p.in === 'header' && p.name === 'idempotency-key'), 'upload: Idempotency-Key')
    const status = op(`/${kind}/{jobId}/status`, 'get')
    t.ok(status.parameters.some((p: any) => p.in === 'path' && p.name === 'jobId' && p.required === true))
    t.same(status.responses['200'].content['application/json'].schema.required, ['job_id', 'status', 'progress', 'processed', 'total', 'eta_seconds'])
    t.ok(status.responses['404'], 'status: not found')
    t.ok(op(`/${kind}/{jobId}/result`, 'get').responses['200'].content['application/json'].schema.properties.outputs)
    t.ok(op(`/${kind}/{jobId}/cancel`, 'post').responses['202'])
    t.ok(op(`/${kind}/{jobId}`, 'delete').responses['200'])
    t.ok(op(`/${kind}/{jobId}/outputs/{name}`, 'get').responses['206'], 'outputs: 206 for a range')
    t.ok(op(`/${kind}/{jobId}/logs`, 'get').parameters.some((p: any) => p.in === 'query' && p.name === 'limit'))
    t.ok(op(`/${kind}/{jobId}/events`, 'get').responses['200'])
    // @fastify/websocket hides WebSocket routes from the document: docs/reference/protocols.md documents their messages.
    t.notOk(paths[`/ws/${kind}/{jobId}`])
  }
  const create = op('/batch', 'post')
  const body = create.requestBody.content['application/json'].schema
  t.same(body.required, ['data'])
  t.same(body.properties.data.properties.rows, { type: 'integer', minimum: 1 }, 'the kind\'s own schema')
  t.ok(body.properties.file.properties.key)
  t.ok(create.responses['202'] && create.responses['422'] && create.responses['429'])
  t.notOk(paths['/dataset']?.post, 'no JSON route for a kind without `create`')
  t.ok(op('/job-progress/events', 'get').parameters.some((p: any) => p.name === 'jobs'))
  t.ok(op('/job-progress/health', 'get').responses['200'])
  t.ok(op('/job-progress/ready', 'get').responses['503'])
  t.ok(op('/job-progress/metrics', 'get').responses['200'])
  t.ok(op('/job-progress/client.js', 'get').responses['304'])
  t.ok(op('/job-progress/webhooks/dead', 'get').responses['200'].content['application/json'].schema.properties.deliveries)
  t.ok(op('/job-progress/webhooks/dead/{id}/replay', 'post').responses['202'])
  // Every HTTP route of the plugin declares its answers in its own schema. (Read from the routes,
  // not the document: the document gives a route without any a default 200 of its own.)
  const http = routes.filter(route => route.websocket !== true && route.method !== 'HEAD')
  t.ok(http.length > 20, 'the plugin\'s routes were seen')
  for (const route of http) t.ok(Object.keys(route.schema?.response ?? {}).length > 0, `${String(route.method)} ${route.url} has response schemas`)
})
