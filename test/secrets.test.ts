import t from 'tap'
import Fastify from 'fastify'
import { Writable } from 'node:stream'
import { jobProgress, jobsProtocol } from '../lib/index'
import { redactUrl } from '../lib/core/redact'
import { connect, lines, redisFor, tempDir, upload } from './helpers/index'

// Credentials never reach a log line of the plugin or its routes, at info or debug level.

const KEY = 'sk-live-9f8e7d6c5b4a'
const WRONG = 'sk-wrong-1a2b3c4d5e'
const TOKEN = 'tok-0123456789abcdef'

t.test('API keys in the query, the Authorization header and the subprotocol stay out of the log', async (t) => {
  const redis = await redisFor(t)
  const logged: string[] = []
  const stream = new Writable({
    write (chunk: Buffer, _enc, done) {
      logged.push(...chunk.toString().split('\n').filter(Boolean))
      done()
    }
  })
  const app = Fastify({ logger: { level: 'debug', stream } })
  await app.register(jobProgress, {
    connection: redis.url,
    kinds: { batch: {} },
    apiKeys: { [KEY]: 'alice' },
    protocols: [jobsProtocol({ path: '/ws/jobs' })],
    session: { secret: 'a-test-secret-of-enough-length' },
    uploadDir: await tempDir(t, 'jp-uploads-')
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const ws = base.replace('http', 'ws')

  const byQuery = await upload(`${base}/batch/upload?api_key=${KEY}`, lines(2))
  t.equal(byQuery.status, 202)
  const jobId = byQuery.body.job_id as string
  t.equal((await upload(`${base}/batch/upload`, lines(2), { headers: { authorization: `Bearer ${KEY}` } })).status, 202)
  t.equal((await fetch(`${base}/batch/${jobId}/status?api_key=${KEY}&token=${TOKEN}`)).status, 200)
  t.equal((await fetch(`${base}/batch/${jobId}/status?API_KEY=${KEY}`)).status, 401, 'a parameter named otherwise is not a key, but is still redacted')
  t.equal((await fetch(`${base}/batch/${jobId}/result?api_key=${WRONG}`)).status, 401)
  t.equal((await fetch(`${base}/batch/${jobId}/status`, { headers: { authorization: `Bearer  ${WRONG}` } })).status, 401)
  t.equal((await fetch(`${base}/batch/${jobId}/status?api_key=${KEY}&api_key=${WRONG}`)).status, 401)

  const socket = connect(t, `${ws}/ws/batch/${jobId}?api_key=${KEY}`)
  await socket.waitFor(m => m.job_id === jobId)
  const refused = connect(t, `${ws}/ws/batch/${jobId}?api_key=${WRONG}`)
  t.equal((await refused.closed).code, 4001)
  const sub = connect(t, `${ws}/ws/jobs`, { protocols: [KEY] })
  await sub.waitFor(m => m.type === 'connected')
  const badSub = connect(t, `${ws}/ws/jobs`, { protocols: [WRONG] })
  await badSub.closed
  await app.close()

  t.ok(logged.some(line => line.includes('api_key=[redacted]')), 'the request lines were logged, with the key redacted')
  t.ok(logged.some(line => line.includes('token=[redacted]')), 'and token')
  const leaks = logged.filter(line => line.includes(KEY) || line.includes(WRONG) || line.includes(TOKEN))
  t.same(leaks, [], `no log line holds a credential (${logged.length} lines scanned)`)
})

t.test('redactUrl: a table', async (t) => {
  const rows: Array<[string, string]> = [
    ['/a', '/a'],
    ['/a?x=1', '/a?x=1'],
    ['/a?api_key=k', '/a?api_key=[redacted]'],
    ['/a?x=1&api_key=k&y=2', '/a?x=1&api_key=[redacted]&y=2'],
    ['/a?token=t&access_token=u', '/a?token=[redacted]&access_token=[redacted]'],
    ['/a?api%5Fkey=k', '/a?api%5Fkey=[redacted]'],
    ['/a?Api_Key=k', '/a?Api_Key=[redacted]'],
    ['/a?api_key', '/a?api_key=[redacted]'],
    ['/a?api_key=k&api_key=k2', '/a?api_key=[redacted]&api_key=[redacted]'],
    ['/a?%zz=1', '/a?%zz=1']
  ]
  for (const [url, expected] of rows) t.equal(redactUrl(url), expected, url)
})
