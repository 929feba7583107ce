import t from 'tap'
import { createServer, type Server } from 'node:http'
import { Redis } from 'ioredis'
import type { AddressInfo } from 'node:net'
import { connect, lines, redisFor, tempDir, upload } from './helpers/index'
import { LOAD_TS, Proc } from './helpers/cluster'
import { freePort } from './helpers/redis'
import { sse } from './helpers/sse'

// One trace from the upload to the socket and SSE writes, across processes: 2 API instances and
// a worker, each with an OpenTelemetry SDK registered by `--import` (test/fixtures/otel-sdk.ts:
// @fastify/otel, OTLP/HTTP export), sending to a receiver in this process.

interface ReceivedSpan {
  name: string
  kind: number
  traceId: string
  spanId: string
  parentSpanId: string
  process: string
  attributes: Record<string, unknown>
  events: string[]
}

// OTLP's JSON encoding: span kinds 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
const SERVER = 2
const PRODUCER = 4
const CONSUMER = 5

const hex = (id: unknown): string => {
  if (typeof id !== 'string' || id === '') return ''
  return /^[0-9a-f]+$/.test(id) && (id.length === 32 || id.length === 16) ? id : Buffer.from(id, 'base64').toString('hex')
}

function attributeValue (value: any): unknown {
  if (value === undefined || value === null) return undefined
  return value.stringValue ?? (value.intValue !== undefined ? Number(value.intValue) : undefined) ?? value.doubleValue ?? value.boolValue
}

/** An OTLP/HTTP receiver: collects every span posted to /v1/traces. */
async function receiver (): Promise<{ server: Server, url: string, spans: ReceivedSpan[] }> {
  const spans: ReceivedSpan[] = []
  const server = createServer((req, res) => {
    let body = ''
    req.setEncoding('utf8')
    req.on('data', (chunk: string) => { body += chunk })
    req.on('end', () => {
      try {
        const payload = JSON.parse(body)
        for (const rs of payload.resourceSpans ?? []) {
          for (const ss of rs.scopeSpans ?? []) {
            for (const s of ss.spans ?? []) {
              const attributes: Record<string, unknown> = {}
              for (const a of s.attributes ?? []) attributes[a.key] = attributeValue(a.value)
              spans.push({ name: s.name, kind: s.kind, traceId: hex(s.traceId), spanId: hex(s.spanId), parentSpanId: hex(s.parentSpanId), process: String(attributes['test.process']), attributes, events: (s.events ?? []).map((e: any) => e.name) })
            }
          }
        }
      } catch {}
      res.writeHead(200, { 'content-type': 'application/json' }).end('{}')
    })
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/traces`, spans }
}

t.test('one trace: upload request → BullMQ add → worker processing → each report → delivery on the instance that wrote it', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-otel-')
  const rx = await receiver()
  t.teardown(async () => await new Promise(resolve => rx.server.close(resolve)))

  const env = (name: string, extra: Record<string, string> = {}): NodeJS.ProcessEnv => ({
    PATH: process.env.PATH,
    REDIS_URL: redis.url,
    UPLOAD_DIR: uploadDir,
    OTEL_PROCESS: name,
    OTEL_SAMPLE_RATIO: '1',
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: rx.url,
    ...extra
  })
  const args = (fixture: string): string[] => [...LOAD_TS, '--require', './test/fixtures/otel-sdk.ts', fixture]
  const procs: Proc[] = []
  t.teardown(async () => { await Promise.all(procs.map(async p => await p.stop())) })
  const api = async (name: string): Promise<{ url: string, ws: string }> => {
    const port = await freePort()
    const proc = new Proc(name, process.execPath, args('test/fixtures/otel-api.ts'), env(name, { PORT: String(port) }))
    procs.push(proc)
    await proc.printed(`listening ${port}`, 20_000)
    return { url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}` }
  }
  const worker = new Proc('worker', process.execPath, args('test/fixtures/otel-worker.ts'), env('worker', { ITEM_DELAY_MS: '150' }))
  procs.push(worker)
  const [a, b] = await Promise.all([api('api-a'), api('api-b'), worker.printed('worker ready', 20_000)])

  const auth = { authorization: 'Bearer key-alice' }
  const up = await upload(`${a.url}/batch/upload`, lines(6), { headers: auth })
  t.equal(up.status, 202)
  const jobId: string = up.body.job_id
  // Watched across instances: a socket on B, an SSE stream on A.
  const socket = connect(t, `${b.ws}/ws/batch/${jobId}`, { headers: auth })
  const stream = await sse(t, `${a.url}/batch/${jobId}/events`, auth)
  t.match(await socket.waitFor((m: any) => m.status === 'complete'), { processed: 6, total: 6 })
  await stream.waitFor(e => e.data?.status === 'succeeded')

  // What the clients got carries no trace context.
  t.notMatch(JSON.stringify(socket.messages), /"tp"|traceparent/, 'the socket messages carry no trace context')
  t.notMatch(stream.body, /"tp"|traceparent/, 'the SSE events carry no trace context')

  // BullMQ keeps the context in the job's options (`tm`), as its own telemetry does.
  const client = new Redis(redis.url)
  t.teardown(() => client.disconnect())
  const opts = JSON.parse(await client.hget(`bull:batch:${jobId}`, 'opts') as string)
  const tm = JSON.parse(opts.tm)
  t.match(tm.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-01$/, 'the job holds a W3C traceparent in tm')
  const traceId = (tm.traceparent as string).split('-')[1]

  const inTrace = (): ReceivedSpan[] => rx.spans.filter(s => s.traceId === traceId)
  const deliveredOn = (name: string): ReceivedSpan[] => inTrace().filter(s => s.name === 'deliver batch' && s.process === name)
  const deadline = Date.now() + 10_000
  const complete = (): boolean => deliveredOn('api-a').length > 0 && deliveredOn('api-b').length > 0 && inTrace().some(s => s.kind === SERVER) &&
    inTrace().some(s => s.name === 'process batch') && inTrace().filter(s => s.name === 'report batch').length >= 6
  while (!complete() && Date.now() < deadline) {
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  const spans = inTrace()
  const byId = new Map(spans.map(s => [s.spanId, s]))
  const names = spans.map(s => `${s.process}:${s.name}`).sort()

  const request = spans.find(s => s.kind === SERVER && s.process === 'api-a')
  t.ok(request, `the upload's request span (@fastify/otel) is in the job's trace: ${names.join(', ')}`)
  const add = spans.find(s => s.kind === PRODUCER && s.name.startsWith('add batch') && s.process === 'api-a')
  t.ok(add, 'BullMQ\'s producer span of the upload\'s Queue.add')
  t.equal(add?.spanId, tm.traceparent.split('-')[2], 'tm names the producer span')
  // The producer span sits under the request (through the handler's spans of @fastify/otel).
  let up1 = add
  while (up1 !== undefined && up1 !== request) up1 = byId.get(up1.parentSpanId)
  t.equal(up1, request, 'the producer span descends from the request span')

  const processing = spans.find(s => s.name === 'process batch' && s.process === 'worker')
  t.equal(processing?.kind, CONSUMER)
  t.equal(processing?.parentSpanId, add?.spanId, 'the worker\'s processing span is a child of the producer span')
  const reports = spans.filter(s => s.name === 'report batch' && s.process === 'worker')
  t.equal(reports.length, 6, 'one span per report')
  t.ok(reports.every(r => r.parentSpanId === processing?.spanId), 'each report is a child of the processing span')
  t.same(reports.map(r => r.attributes['jp.processed']).sort(), [1, 2, 3, 4, 5, 6])

  const reportIds = new Set(reports.map(r => r.spanId))
  for (const name of ['api-b', 'api-a']) {
    const deliveries = deliveredOn(name)
    t.ok(deliveries.length >= 1, `${name} has delivery spans (${deliveries.length})`)
    t.ok(deliveries.every(d => reportIds.has(d.parentSpanId)), `${name}: each delivery span is a child of the report it wrote`)
    t.ok(deliveries.every(d => d.kind === CONSUMER && d.attributes['jp.job.id'] === jobId && d.events.includes('write')), `${name}: for this job, with a write event per watcher`)
  }
  // A report is delivered by the instance whose watcher it reached, not by every instance.
  const parents = (name: string): Set<string> => new Set(deliveredOn(name).map(d => d.parentSpanId))
  t.ok([...parents('api-b')].some(id => parents('api-a').has(id)), 'the same report was delivered on both instances, each in its own span')
})
