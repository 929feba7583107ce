import t from 'tap'
import Fastify from 'fastify'
import { Writable } from 'node:stream'
import jobProgress from '../lib/index'
import { isPublicAddress } from '../lib/channels/webhooks/address'
import { redactEndpoint } from '../lib/core/redact'
import { lines, redisFor, startApp, tempDir, TEST_OPTIONS, upload } from './helpers/index'

// Holes found by reading the code: each case below failed before its fix.

t.test('webhook URLs are logged without their query or credentials', async (t) => {
  const rows: Array<[string, string]> = [
    ['https://hooks.example.com/jobs?token=s3cret', 'https://hooks.example.com/jobs?[redacted]'],
    ['https://hooks.example.com/jobs?sig=a&x=b', 'https://hooks.example.com/jobs?[redacted]'],
    ['https://user:pass@hooks.example.com:8443/in', 'https://[redacted]@hooks.example.com:8443/in'],
    ['https://hooks.example.com/plain', 'https://hooks.example.com/plain'],
    ['not a url?token=s3cret', '[redacted]']
  ]
  for (const [url, logged] of rows) t.equal(redactEndpoint(url), logged, url)
})

t.test('the health, readiness and metrics routes log no credentials', async (t) => {
  const redis = await redisFor(t)
  let logged = ''
  const stream = new Writable({ write (chunk: Buffer, _enc, done) { logged += chunk.toString(); done() } })
  const app = Fastify({ logger: { level: 'info', stream } })
  await app.register(jobProgress, { ...TEST_OPTIONS, connection: redis.url, uploadDir: await tempDir(t), metrics: true })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}/job-progress`
  for (const path of ['/health', '/ready', '/metrics']) {
    const res = await fetch(`${base}${path}?token=probe-secret&api_key=key-secret`)
    t.equal(res.status, 200, path)
    await res.arrayBuffer()
  }
  t.match(logged, /\/job-progress\/health\?token=\[redacted\]/, 'the probes are logged')
  t.notMatch(logged, /probe-secret|key-secret/, 'without the secrets in their URLs')
})

t.test('the SSRF guard decodes 6to4 and Teredo addresses and applies the IPv4 rule', async (t) => {
  const rows: Array<[string, boolean]> = [
    ['2002:7f00:1::', false], // 6to4 of 127.0.0.1
    ['2002:a00:1::1', false], // 10.0.0.1
    ['2002:a9fe:a9fe::', false], // 169.254.169.254, cloud metadata
    ['2002:c0a8:101::1', false], // 192.168.1.1
    ['2002:808:808::1', true], // 8.8.8.8
    ['2001:0:808:808:0:0:80ff:fffe', false], // Teredo, client 127.0.0.1 (inverted)
    ['2001:0:7f00:1::f7f7:f7f7', false], // Teredo, server 127.0.0.1
    ['2001:0:808:808::f7f7:f7f7', true], // Teredo, server and client 8.8.8.8
    ['2001:4860:4860::8888', true], // a plain public address under 2001::/16
    ['::ffff:10.0.0.1', false]
  ]
  for (const [address, allowed] of rows) t.equal(isPublicAddress(address), allowed, address)
})

t.test('uploads raced with one Idempotency-Key at the owner\'s last slot all get the first job, and the window keeps its count', async (t) => {
  const redis = await redisFor(t)
  const { url } = await startApp(t, redis, { quotas: { maxJobsPerWindow: 2, windowMs: 60_000 } })
  const first = await upload(`${url}/batch/upload`, lines(1))
  t.equal(first.status, 202)
  const cookie = first.cookie
  // One slot left; five uploads of the same request, at once.
  const raced = await Promise.all(Array.from({ length: 5 }, async () => await upload(`${url}/batch/upload`, lines(2), { cookie, headers: { 'idempotency-key': 'raced-key' } })))
  t.same(raced.map(r => r.status), [202, 202, 202, 202, 202], 'none refused for the slot its own key holds')
  t.equal(new Set(raced.map(r => r.body.job_id)).size, 1, 'one job answers them all')
  const third = await upload(`${url}/batch/upload`, lines(3), { cookie })
  t.equal(third.status, 429, 'the window counted two jobs, not more, not less')
})
