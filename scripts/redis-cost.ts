/**
 * What one job's progress costs Redis as API instances are added: with the job watched through
 * ONE instance, the commands and bytes per progress event must not grow with the number of
 * instances (each event is read once through the bridge's consumer group and published to the
 * job's own channel, which only the watching instance subscribes to).
 *
 *   npx tsx scripts/redis-cost.ts [--instances 1,2,4] [--items 400] [--delay 10] [--idle 6000]
 *
 * Real processes: a private redis-server, N API instances and one worker of the example. For each
 * N it reads INFO commandstats / INFO stats before and after one job (upload, watch on instance
 * 0, all progress, final message) and prints the deltas per progress event. It also measures the
 * instances' idle cost (blocking bridge reads timing out, claim sweeps), which is per second, not
 * per event.
 */
import { setTimeout as sleep } from 'node:timers/promises'
import type { Redis } from 'ioredis'
import { Cluster } from '../test/helpers/cluster'
import { Client, lines, upload } from '../test/helpers/index'

function arg (name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`)
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1] : fallback
}

const INSTANCES = arg('instances', '1,2,4').split(',').map(Number)
const ITEMS = Number(arg('items', '400'))
const DELAY = arg('delay', '10')
const IDLE_MS = Number(arg('idle', '6000'))

interface Counters { calls: Map<string, number>, outBytes: number, inBytes: number }

/** Calls per command (INFO itself left out: it is the measurement) and network bytes. */
async function counters (redis: Redis): Promise<Counters> {
  const stats = await redis.info('commandstats')
  const calls = new Map<string, number>()
  for (const m of stats.matchAll(/^cmdstat_([^:]+):calls=(\d+)/gm)) {
    if (m[1] !== 'info') calls.set(m[1], Number(m[2]))
  }
  const general = await redis.info('stats')
  const num = (field: string): number => Number(new RegExp(`^${field}:(\\d+)`, 'm').exec(general)?.[1] ?? 0)
  return { calls, outBytes: num('total_net_output_bytes'), inBytes: num('total_net_input_bytes') }
}

function delta (before: Counters, after: Counters): { calls: Map<string, number>, total: number, outBytes: number, inBytes: number } {
  const calls = new Map<string, number>()
  let total = 0
  for (const [name, n] of after.calls) {
    const d = n - (before.calls.get(name) ?? 0)
    if (d > 0) {
      calls.set(name, d)
      total += d
    }
  }
  return { calls, total, outBytes: after.outBytes - before.outBytes, inBytes: after.inBytes - before.inBytes }
}

interface Row {
  instances: number
  events: number
  seconds: number
  total: number
  publish: number
  xreadgroup: number
  xack: number
  outBytes: number
  idlePerSecond: number
  top: string
}

async function measure (n: number): Promise<Row> {
  const teardowns: Array<() => unknown> = []
  const t = { teardown: (fn: () => unknown) => { teardowns.push(fn) } }
  try {
    const cluster = await Cluster.start(t, { apis: n, workers: 1, env: { ITEM_DELAY_MS: DELAY, LOG_LEVEL: 'error' } })
    const redis = cluster.redis.client()
    t.teardown(() => redis.disconnect())
    const api = cluster.apis[0]
    // Let every instance settle into its steady state (groups made, first claim sweep done).
    await sleep(1_000)

    // Idle: nothing is uploaded or watched.
    const idleBefore = await counters(redis)
    await sleep(IDLE_MS)
    const idle = delta(idleBefore, await counters(redis))

    // One job, uploaded and watched through instance 0 only.
    const before = await counters(redis)
    const started = Date.now()
    const up = await upload(`${api.url}/batch/upload`, lines(ITEMS))
    if (up.status !== 202) throw new Error(`upload failed: ${up.status} ${JSON.stringify(up.body)}`)
    const watcher = new Client(`${api.ws}/ws/batch/${up.body.job_id}`, { headers: { cookie: up.cookie as string } })
    const final = await watcher.waitFor(m => m.status !== 'processing', 120_000)
    if (final.status !== 'complete') throw new Error(`job ended ${JSON.stringify(final)}`)
    await watcher.closed
    const seconds = (Date.now() - started) / 1000
    // The last acknowledgements and unsubscribe land right after the final message.
    await sleep(300)
    const job = delta(before, await counters(redis))

    // The demo processor reports 0/total once, then once per record.
    const events = ITEMS + 1
    const get = (name: string): number => job.calls.get(name) ?? 0
    const top = [...job.calls].sort((x, y) => y[1] - x[1]).slice(0, 6).map(([k, v]) => `${k} ${(v / events).toFixed(2)}`).join(', ')
    return {
      instances: n,
      events,
      seconds,
      total: job.total / events,
      publish: get('publish') / events,
      xreadgroup: get('xreadgroup') / events,
      xack: get('xack') / events,
      outBytes: job.outBytes / events,
      idlePerSecond: idle.total / (IDLE_MS / 1000),
      top
    }
  } finally {
    for (const fn of teardowns.reverse()) await fn()
  }
}

async function main (): Promise<void> {
  const rows: Row[] = []
  for (const n of INSTANCES) {
    process.stderr.write(`measuring ${n} instance(s) ...\n`)
    rows.push(await measure(n))
  }
  const f = (x: number, d = 2): string => x.toFixed(d)
  process.stdout.write(`\nOne job of ${ITEMS} records (${ITEMS + 1} progress events, one every ${DELAY} ms), watched through one instance.\n\n`)
  process.stdout.write('| API instances | job (s) | Redis calls / event | PUBLISH / event | XREADGROUP / event | XACK / event | bytes out / event | idle calls / s (whole cluster) |\n')
  process.stdout.write('| --- | --- | --- | --- | --- | --- | --- | --- |\n')
  for (const r of rows) {
    process.stdout.write(`| ${r.instances} | ${f(r.seconds, 1)} | ${f(r.total)} | ${f(r.publish)} | ${f(r.xreadgroup)} | ${f(r.xack)} | ${f(r.outBytes, 0)} | ${f(r.idlePerSecond, 1)} |\n`)
  }
  process.stdout.write('\nMost frequent commands per event:\n')
  for (const r of rows) process.stdout.write(`  ${r.instances}: ${r.top}\n`)
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`)
  process.exit(1)
})
