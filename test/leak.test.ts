import t, { type Test } from 'tap'
import { once } from 'node:events'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import WebSocket from 'ws'
import Fastify from 'fastify'
import { jobsProtocol, type JobProgressOptions } from '../lib/index'
import { Bridge } from '../lib/bridge/bridge'
import { Keys } from '../lib/core/keys'
import { eventually, lines, redisFor, startApp, upload } from './helpers/index'

// Connect, subscribe, get the snapshot, close: thousands of times. Whatever a connection leaves
// behind (a session, a watch, a listener, a timer, a rendered message) grows the heap with the
// count; allocator high-water does not show in the heap after a full GC.

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

async function settledHeap (): Promise<number> {
  for (let i = 0; i < 4; i++) {
    gc()
    await new Promise(resolve => setImmediate(resolve))
  }
  return process.memoryUsage().heapUsed
}

t.test('5,000 connect/subscribe/close cycles after 1,000 warm-up ones leave the heap where it was', async (t) => {
  const redis = await redisFor(t)
  const { url, ws, app } = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol()] })
  const up = await upload(`${url}/batch/upload`, lines(1), { headers: { authorization: 'Bearer k' } })
  const jobId = up.body.job_id as string

  async function cycles (n: number): Promise<void> {
    // 50 at a time, as many clients coming and going would.
    const one = async (): Promise<void> => {
      const client = new WebSocket(`${ws}/ws/jobs?api_key=k`)
      client.on('message', (data) => {
        const m = JSON.parse(data.toString()) as { type: string }
        if (m.type === 'connected') client.send(JSON.stringify({ action: 'subscribe', job_id: jobId }))
        if (m.type === 'job_update') client.close()
      })
      await once(client, 'close')
    }
    for (let i = 0; i < n; i += 50) await Promise.all(Array.from({ length: 50 }, one))
  }

  await cycles(1000)
  await eventually(() => app.jobProgress.stats().sockets === 0 && app.jobProgress.stats().watchedJobs === 0)
  const before = await settledHeap()
  const rssBefore = process.memoryUsage().rss
  await cycles(5000)
  t.ok(await eventually(() => app.jobProgress.stats().sockets === 0 && app.jobProgress.stats().watchedJobs === 0), 'sockets and watches back to 0')
  const after = await settledHeap()
  const grown = after - before
  t.comment(`RSS ${(rssBefore / 1048576).toFixed(0)} → ${(process.memoryUsage().rss / 1048576).toFixed(0)} MB (allocator pages, not live objects)`)
  t.ok(grown < 5 * 1024 * 1024, `heap ${(before / 1048576).toFixed(1)} → ${(after / 1048576).toFixed(1)} MB after 5,000 more cycles (${(grown / 5000).toFixed(0)} bytes per cycle; a connection left behind costs several KB)`)
})

/**
 * An app whose upgrade requests are watched through weak references (a kept one is reachable from
 * its socket), with an idle job (no worker: its sockets stay open after their first message).
 */
async function watchedUpgrades (t: Test, opts: Partial<JobProgressOptions>): Promise<{ ws: string, jobId: string, kept: () => Promise<unknown[]> }> {
  const redis = await redisFor(t)
  const raws: Array<WeakRef<object>> = []
  const { url, ws } = await startApp(t, redis, { apiKeys: { k: 'alice', b: 'bob' }, protocols: [jobsProtocol()], ...opts }, (app) => {
    app.addHook('onRequest', async (request) => { if (request.url.startsWith('/ws/')) raws.push(new WeakRef(request.raw)) })
  })
  const up = await upload(`${url}/batch/upload`, lines(1), { headers: { authorization: 'Bearer k' } })
  const kept = async (): Promise<unknown[]> => {
    await settledHeap()
    return raws.map(r => r.deref()).filter(raw => raw !== undefined)
  }
  return { ws, jobId: up.body.job_id as string, kept }
}

async function openIdle (t: Test, url: string): Promise<WebSocket> {
  const client = new WebSocket(url)
  t.teardown(() => client.terminate())
  await once(client, 'message')
  return client
}

t.test('an open idle socket does not keep its upgrade request', async (t) => {
  const { ws, jobId, kept } = await watchedUpgrades(t, {})
  await Promise.all([
    ...Array.from({ length: 10 }, async () => await openIdle(t, `${ws}/ws/batch/${jobId}?api_key=k`)),
    ...Array.from({ length: 5 }, async () => await openIdle(t, `${ws}/ws/jobs?api_key=k`))
  ])
  t.equal((await kept()).length, 0, 'none of 15 open sockets (per-job and jobs protocol) keeps its request')
})

t.test('a socket an access policy may still be asked about keeps its request, and the policy gets it', async (t) => {
  const asked: unknown[] = []
  const { ws, jobId, kept } = await watchedUpgrades(t, {
    // Bob may watch alice's jobs: the policy is asked on his subscribes, with the upgrade request.
    canAccess: (request, _job, _action, requester) => {
      asked.push(request.raw)
      return requester === 'bob'
    }
  })
  await Promise.all(Array.from({ length: 10 }, async () => await openIdle(t, `${ws}/ws/batch/${jobId}?api_key=k`)))
  const bob = await openIdle(t, `${ws}/ws/jobs?api_key=b`)
  const left = await kept()
  t.equal(left.length, 1, 'the per-job sockets (no later subscribe) let theirs go; the jobs-protocol socket keeps its own')
  bob.send(JSON.stringify({ action: 'subscribe', job_id: jobId }))
  await new Promise<void>((resolve) => bob.on('message', (data) => {
    if ((JSON.parse(data.toString()) as { type: string }).type === 'job_update') resolve()
  }))
  t.equal(asked.at(-1), left[0], 'bob watches alice\'s job: the policy got his upgrade request')
})

t.test('a bridge relaying 2,000 events one read at a time keeps nothing per read', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  const sub = redis.client()
  t.teardown(() => { r.disconnect(); sub.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  let got = 0
  let next: (() => void) | null = null
  sub.on('message', () => {
    got++
    next?.()
  })
  await sub.subscribe(keys.channel('batch', 'j1'))
  for (const ordered of [true, false]) {
    const cmd = redis.client()
    const blocking = redis.client()
    const bridge = new Bridge({ redis: cmd, blocking, keys, queues: ['batch'], group: `g-${String(ordered)}`, consumer: 'me', blockMs: 5_000, claimIdleMs: 60_000, claimIntervalMs: 60_000, consumerIdleMs: 600_000, ordered, log: Fastify({ logger: { level: 'silent' } }).log })
    await bridge.start()
    // One at a time, each published before the next is written: every event is a read of its own.
    const relay = async (n: number): Promise<void> => {
      for (let i = 0; i < n; i++) {
        const want = got + 1
        const published = new Promise<void>(resolve => { next = () => { if (got >= want) resolve() } })
        await r.xadd(stream, '*', 'event', 'progress', 'jobId', 'j1', 'data', String(i))
        await published
      }
    }
    await relay(300)
    const before = await settledHeap()
    await relay(2_000)
    const grown = await settledHeap() - before
    await bridge.close()
    cmd.disconnect()
    blocking.disconnect()
    // A read's reply kept until close() (each read raced against one long-lived promise) costs about 1 KB.
    t.ok(grown < 1024 * 1024, `${ordered ? 'ordered' : 'from Node'}: heap grew ${(grown / 1024).toFixed(0)} KB over 2,000 reads (${(grown / 2000).toFixed(0)} bytes per read)`)
  }
})
