import t from 'tap'
import { Redis } from 'ioredis'
import Fastify from 'fastify'
import { resolveOptions } from '../lib/options'
import { checkEndpointUrl, embeddedIPv4, hostAllowed, isPublicAddress, resolveEndpoint } from '../lib/channels/webhooks/address'
import { parseRetryAfter } from '../lib/channels/webhooks/http'
import { deliveryId, eventOf, retryDelay, Webhooks } from '../lib/channels/webhooks/webhooks'
import { Keys } from '../lib/core/keys'
import { parseVersion } from '../lib/wire/version'
import { eventually, redisFor } from './helpers/index'
import { newSecret, Receiver } from './helpers/receiver'

t.test('isPublicAddress: one row per range', async (t) => {
  const rows: Array<[string, boolean]> = [
    ['93.184.216.34', true], ['8.8.8.8', true], ['2606:4700::1111', true],
    ['127.0.0.1', false], ['127.255.0.9', false], ['10.1.2.3', false], ['172.16.0.1', false], ['172.31.255.255', false],
    ['172.32.0.1', true], ['192.168.1.1', false], ['169.254.169.254', false], ['100.64.0.1', false], ['0.0.0.0', false],
    ['224.0.0.1', false], ['255.255.255.255', false], ['::1', false], ['::', false], ['fe80::1', false], ['fc00::1', false],
    ['fd00:ec2::254', false], ['::ffff:127.0.0.1', false], ['::ffff:7f00:1', false], ['::ffff:a9fe:a9fe', false],
    ['::ffff:5db8:d822', true], ['64:ff9b::127.0.0.1', false], ['::127.0.0.1', false], ['not-an-ip', false]
  ]
  for (const [address, expected] of rows) t.equal(isPublicAddress(address), expected, address)
  t.equal(embeddedIPv4('::ffff:0:10.0.0.1'), '10.0.0.1')
  t.equal(embeddedIPv4('2001:db8::1'), null)
})

t.test('hostAllowed and checkEndpointUrl: one row per rule', async (t) => {
  const rows: Array<[string, string[], boolean]> = [
    ['https://hooks.example.com/x', ['hooks.example.com'], true],
    ['https://HOOKS.example.com/x', ['hooks.example.com'], true],
    ['https://a.hooks.example.com/x', ['hooks.example.com'], false],
    ['https://a.example.com/x', ['*.example.com'], true],
    ['https://example.com/x', ['*.example.com'], false],
    ['https://evilexample.com/x', ['*.example.com'], false],
    ['https://example.com:8443/x', ['example.com:8443'], true],
    ['https://example.com/x', ['example.com:8443'], false],
    ['https://example.com/x', ['example.com:443'], true],
    ['https://anything.test/', ['*'], true]
  ]
  for (const [url, patterns, expected] of rows) t.equal(hostAllowed(new URL(url), patterns), expected, `${url} ${patterns.join(',')}`)
  t.throws(() => checkEndpointUrl('http://a.example.com/', ['*.example.com'], false), /scheme must be https$/)
  t.equal(checkEndpointUrl('http://a.example.com/', ['*.example.com'], true).host, 'a.example.com')
  await t.rejects(resolveEndpoint(new URL('https://x.test/'), async () => { throw Object.assign(new Error('nope'), { code: 'ENOTFOUND' }) }, false), /cannot resolve x\.test: ENOTFOUND/)
  await t.rejects(resolveEndpoint(new URL('https://x.test/'), async () => [], false), /no address/)
  t.same(await resolveEndpoint(new URL('http://[::1]:9/'), async () => [], true), [{ address: '::1', family: 6 }])
})

t.test('parseRetryAfter and retryDelay', async (t) => {
  t.equal(parseRetryAfter('5'), 5000)
  t.equal(parseRetryAfter(undefined), null)
  t.equal(parseRetryAfter('soon'), null)
  t.equal(parseRetryAfter(new Date(10_000).toUTCString(), 4_000), 6_000)
  t.equal(parseRetryAfter(new Date(1_000).toUTCString(), 4_000), 0)
  const o = { backoffMs: 1000, maxBackoffMs: 10_000, jitter: 0.2, maxRetryAfterMs: 60_000 }
  t.equal(retryDelay(o, 1, null, 0.5), 1000)
  t.equal(retryDelay(o, 3, null, 0.5), 4000)
  t.equal(retryDelay(o, 10, null, 0.5), 10_000, 'capped')
  t.equal(retryDelay(o, 1, null, 0), 800, 'jitter down')
  t.equal(retryDelay(o, 1, null, 1), 1200, 'jitter up')
  t.equal(retryDelay(o, 1, 30_000, 0.5), 30_000, 'Retry-After when longer')
  t.equal(retryDelay(o, 3, 10, 0.5), 4000, 'the backoff when longer')
  t.equal(retryDelay(o, 1, 3_600_000, 0.5), 60_000, 'Retry-After capped')
  // The default schedule spans about a day.
  const d = resolveOptions({ kinds: { a: {} } }).webhooks
  let total = 0
  for (let n = 1; n < d.attempts; n++) total += retryDelay(d, n, null, 0.5)
  t.ok(total > 18 * 3600_000 && total < 30 * 3600_000, `default schedule: ${(total / 3600_000).toFixed(1)} h`)
  t.match(deliveryId('q', 'j', '1-0', 'https://a/'), /^msg_[A-Za-z0-9_-]{27}$/)
  t.not(deliveryId('q', 'j', '1-0', 'https://a/'), deliveryId('q', 'j', '1-1', 'https://a/'))
})

t.test('eventOf: one row per stream event', async (t) => {
  const e = (event: string, fields: Record<string, string> = {}) => ({ queue: 'q', jobId: 'j', event, id: '2000-0', t: 2000, final: ['completed', 'failed', 'cancelled'].includes(event), fields })
  t.match(eventOf('k', e('progress', { data: '{"processed":2,"total":4,"attempt":2}' })), { state: 'active', processed: 2, total: 4, attempt: 2, ts: 2000 })
  t.match(eventOf('k', e('active')), { state: 'active', processed: 0 })
  t.match(eventOf('k', e('delayed')), { state: 'queued' })
  t.match(eventOf('k', e('completed', { returnvalue: '{"a":1}' }), '{"processed":4,"total":4}'), { state: 'completed', result: { a: 1 }, processed: 4, total: 4 })
  t.match(eventOf('k', e('completed', { returnvalue: 'not json' })), { state: 'completed', result: 'not json' })
  t.match(eventOf('k', e('failed', { failedReason: 'boom' })), { state: 'failed', error: 'boom' })
  t.match(eventOf('k', e('failed')), { state: 'failed', error: 'failed' })
  t.match(eventOf('k', e('cancelled')), { state: 'cancelled', error: 'cancelled' })
  t.equal(eventOf('k', e('removed')), null)
})

t.test('a stream entry handled twice (a bridge takeover) makes one delivery', async (t) => {
  const redis = await redisFor(t)
  const secret = newSecret()
  const receiver = await Receiver.start(t, [secret])
  const opts = resolveOptions({ connection: redis.url, kinds: { batch: { webhook: { url: receiver.url } } }, webhooks: { secret, backoffMs: 100 } })
  const conns: Redis[] = []
  const open = (): Redis => { const r = new Redis(redis.url, { maxRetriesPerRequest: null }); conns.push(r); return r }
  t.teardown(() => { for (const r of conns) r.disconnect() })
  const webhooks = Webhooks.create({ opts, connection: open(), cmd: open(), connect: open, keys: new Keys(opts), log: Fastify().log }) as Webhooks
  t.teardown(async () => await webhooks.close())
  t.equal(Webhooks.create({ opts: resolveOptions({ kinds: { a: {} } }), connection: open(), cmd: open(), connect: open, keys: new Keys(opts), log: Fastify().log }), null, 'nothing without a kind that has a webhook')
  const event = { queue: 'batch', jobId: '6b1f8e5e-1111-4a4a-9a9a-123456789abc', event: 'completed', id: '1700000000000-0', t: 1700000000000, final: true, fields: { returnvalue: '{"ok":true}' } }
  void webhooks.onEvent(event)
  void webhooks.onEvent({ ...event })
  void webhooks.onEvent({ ...event, queue: 'other' })
  const [call] = await receiver.waitCalls(1)
  t.ok(await eventually(async () => (await webhooks.queue.getJobCounts('completed')).completed === 1), 'delivered')
  void webhooks.onEvent({ ...event })
  t.ok(await eventually(async () => {
    const counts = await webhooks.queue.getJobCounts()
    return Object.values(counts).reduce((a, b) => a + b, 0) === 1
  }), 'one delivery job in all, also after a third handling')
  t.equal(receiver.calls.length, 1)
  // The job is not in Redis: its attempt cannot be read, and the version says 1.
  t.same(JSON.parse(call.body), { type: 'job_update', job_id: event.jobId, status: 'succeeded', result: { ok: true }, error: null, progress: 100, processed: 0, total: 0, eta_seconds: 0, ts: 1700000000, version: '1.1700000000000-0' })
})

t.test('payload versions: a final recovered after a gap, a progress event, each `<attempt>.<entry id>`', async (t) => {
  const redis = await redisFor(t)
  const secret = newSecret()
  const receiver = await Receiver.start(t, [secret])
  const opts = resolveOptions({ connection: redis.url, kinds: { batch: { webhook: { url: receiver.url, events: ['final', 'progress'] } } }, webhooks: { secret, backoffMs: 100 } })
  const conns: Redis[] = []
  const open = (): Redis => { const r = new Redis(redis.url, { maxRetriesPerRequest: null }); conns.push(r); return r }
  t.teardown(() => { for (const r of conns) r.disconnect() })
  const webhooks = Webhooks.create({ opts, connection: open(), cmd: open(), connect: open, keys: new Keys(opts), log: Fastify().log }) as Webhooks
  t.teardown(async () => await webhooks.close())
  const jobId = '6b1f8e5e-2222-4a4a-9a9a-123456789abc'
  // As lib/bridge/final-recovery.ts hands it: the attempt from the job, the gap's last entry id.
  void webhooks.onEvent({ queue: 'batch', jobId, event: 'failed', id: '1700000005000-0', t: 1700000004000, final: true, fields: { failedReason: 'boom' }, attempt: 2, recovered: true })
  void webhooks.onEvent({ queue: 'batch', jobId: '6b1f8e5e-3333-4a4a-9a9a-123456789abc', event: 'progress', id: '1700000001000-4', t: 1700000001000, final: false, fields: { data: '{"processed":1,"total":2,"attempt":3}' } })
  const calls = await receiver.waitCalls(2)
  const bodies = new Map(calls.map(c => [JSON.parse(c.body).job_id as string, JSON.parse(c.body)]))
  t.equal(bodies.get(jobId).version, '2.1700000005000-0', 'the recovered final: its attempt and the gap\'s end')
  t.same(parseVersion(bodies.get(jobId).version), { attempt: 2, ms: 1700000005000, seq: 0 }, 'and it parses')
  t.equal(bodies.get('6b1f8e5e-3333-4a4a-9a9a-123456789abc').version, '3.1700000001000-4', 'progress: the attempt it reports and its entry id')
})
