/**
 * Webhooks: deliveries per second to a local receiver, and the Redis commands a webhook adds to a
 * job, next to the job's own cost, in the same run on the same private redis-server.
 *
 *   npx tsx bench/webhooks.ts              # 300 jobs per phase, 2000 deliveries
 *   npx tsx bench/webhooks.ts --jobs=100 --deliveries=500
 *
 * Phases, one after the other, each measured by INFO commandstats before and after:
 *   1. `plain` jobs: upload, a real BullMQ worker reports 3 progress steps and completes, the
 *      bridge relays every event; no webhook.
 *   2. `hooked` jobs: the same, on a kind whose final state is delivered to the receiver.
 *   3. deliveries alone: delivery jobs added in bulk to the delivery queue, drained by the
 *      plugin's delivery worker (default concurrency) to the receiver.
 */
import Fastify from 'fastify'
import { Queue } from 'bullmq'
import { createServer } from 'node:http'
import type { AddressInfo } from 'node:net'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createJobWorker, DiskStorage, jobProgress } from '../lib/index'
import { lines, upload } from '../test/helpers/index'
import { newSecret } from '../test/helpers/receiver'
import { BenchRedis } from './lib/redis'

const arg = (name: string, fallback: number): number => {
  const found = process.argv.find(a => a.startsWith(`--${name}=`))
  return found === undefined ? fallback : Number(found.split('=')[1])
}
const JOBS = arg('jobs', 300)
const DELIVERIES = arg('deliveries', 2000)

async function main (): Promise<void> {
  const redis = await BenchRedis.start()
  const dir = await mkdtemp(join(tmpdir(), 'jp-bench-webhooks-'))
  let received = 0
  let onReceived = (): void => {}
  const receiver = createServer((req, res) => {
    req.resume()
    req.on('end', () => {
      received++
      res.writeHead(204).end()
      onReceived()
    })
  })
  await new Promise<void>(resolve => receiver.listen(0, '127.0.0.1', resolve))
  const receiverUrl = `http://127.0.0.1:${(receiver.address() as AddressInfo).port}/hook`
  const waitReceived = async (n: number): Promise<void> => {
    if (received >= n) return
    await new Promise<void>(resolve => { onReceived = () => { if (received >= n) resolve() } })
  }

  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection: redis.url,
    kinds: { plain: {}, hooked: { webhook: { url: receiverUrl } } },
    webhooks: { secret: newSecret() },
    getOwner: () => 'bench',
    uploadDir: dir,
    throttleMs: 0
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const url = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  const storage = new DiskStorage(dir)
  const workers = ['plain', 'hooked'].map(kind => createJobWorker({ kind, connection: redis.url, storage, workerOptions: { concurrency: 8 } }, async (ctx) => {
    for (let i = 1; i <= 3; i++) await ctx.report(i, 3)
    return { ok: true }
  }))
  const probe = redis.info
  // The bench's own polls are counted and taken out of the figures.
  const mine: Record<string, number> = {}
  const count = (name: string): void => { mine[name] = (mine[name] ?? 0) + 1 }
  const settled = async (queue: string, n: number): Promise<void> => {
    for (;;) {
      count('zcard')
      count('xpending')
      const [done, pending] = await Promise.all([probe.zcard(`bull:${queue}:completed`), probe.xpending(`bull:${queue}:events`, 'jp-bridge') as Promise<[number]>])
      if (done >= n && pending[0] === 0) return
      await new Promise(resolve => setTimeout(resolve, 20))
    }
  }
  const total = (c: Record<string, number>): number => Object.values(c).reduce((a, b) => a + b, 0)
  const snapshot = async (): Promise<Record<string, number>> => {
    const { commands } = await redis.snapshot()
    for (const [k, v] of Object.entries(mine)) commands[k] = (commands[k] ?? 0) - v
    return commands
  }
  const diff = (a: Record<string, number>, b: Record<string, number>): Record<string, number> => {
    const out: Record<string, number> = {}
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      const d = (b[k] ?? 0) - (a[k] ?? 0)
      if (d !== 0) out[k] = d
    }
    return out
  }
  const phase = async (kind: string, wait: () => Promise<void>): Promise<{ perJob: number, commands: Record<string, number>, ms: number }> => {
    const before = await snapshot()
    const start = Date.now()
    for (let i = 0; i < JOBS; i += 20) {
      await Promise.all(Array.from({ length: Math.min(20, JOBS - i) }, async () => await upload(`${url}/${kind}/upload`, lines(3))))
    }
    await wait()
    const ms = Date.now() - start
    const commands = diff(before, await snapshot())
    return { perJob: total(commands) / JOBS, commands, ms }
  }

  // Warm-up: scripts loaded, groups made, connections up.
  await upload(`${url}/plain/upload`, lines(3))
  await upload(`${url}/hooked/upload`, lines(3))
  await settled('plain', 1)
  await settled('hooked', 1)
  await waitReceived(1)

  const plain = await phase('plain', async () => await settled('plain', JOBS + 1))
  const hooked = await phase('hooked', async () => {
    await settled('hooked', JOBS + 1)
    await waitReceived(JOBS + 1)
    for (;;) {
      count('zcard')
      if (await probe.zcard('bull:jp-webhooks:completed') >= JOBS + 1) break
      await new Promise(resolve => setTimeout(resolve, 20))
    }
  })

  // Deliveries alone: the delivery worker, signing and POSTing, nothing else.
  const deliveries = new Queue('jp-webhooks', { connection: { host: '127.0.0.1', port: redis.port } })
  const payload = JSON.stringify({ type: 'job_update', job_id: 'x', status: 'succeeded', result: { ok: true }, error: null, progress: 100, processed: 3, total: 3, eta_seconds: 0, ts: 0 })
  const base = received
  const before = await snapshot()
  const start = Date.now()
  for (let i = 0; i < DELIVERIES; i += 500) {
    await deliveries.addBulk(Array.from({ length: Math.min(500, DELIVERIES - i) }, (_, j) => ({
      name: 'deliver',
      data: { url: receiverUrl, trusted: true, kind: 'hooked', jobId: 'x', event: 'completed', payload },
      opts: { jobId: `msg_bench_${i + j}`, attempts: 3, removeOnComplete: { age: 3600 } }
    })))
  }
  await waitReceived(base + DELIVERIES)
  const deliveryMs = Date.now() - start
  const deliveryCommands = total(diff(before, await snapshot()))

  const added = diff(plain.commands, hooked.commands)
  const top = Object.entries(added).map(([k, v]) => [k, v / JOBS] as const).filter(([, v]) => Math.abs(v) >= 0.05).sort((a, b) => b[1] - a[1])
  const out = {
    jobs: JOBS,
    redisCommandsPerJob: { plain: round(plain.perJob), hooked: round(hooked.perJob), addedByWebhook: round(hooked.perJob - plain.perJob), addedRatio: round(hooked.perJob / plain.perJob) },
    addedPerJobByCommand: Object.fromEntries(top.map(([k, v]) => [k, round(v)])),
    jobsPerSecond: { plain: round(JOBS / plain.ms * 1000), hooked: round(JOBS / hooked.ms * 1000) },
    deliveries: { count: DELIVERIES, perSecond: round(DELIVERIES / deliveryMs * 1000), redisCommandsPerDelivery: round(deliveryCommands / DELIVERIES) },
    node: process.version,
    redis: BenchRedis.version()
  }
  process.stdout.write(JSON.stringify(out, null, 2) + '\n')

  await deliveries.close()
  await Promise.all(workers.map(async w => await w.close()))
  await app.close()
  receiver.closeAllConnections()
  await new Promise<void>(resolve => receiver.close(() => resolve()))
  await redis.stop()
  await rm(dir, { recursive: true, force: true })
}

function round (n: number): number {
  return Math.round(n * 100) / 100
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? String(err)}\n`)
  process.exit(1)
})
