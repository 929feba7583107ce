import t from 'tap'
import { Queue } from 'bullmq'
import { randomUUID } from 'node:crypto'
import { createJobWorker, DiskStorage } from '../lib/index'
import { Hub } from '../lib/hub/hub'
import { Keys } from '../lib/core/keys'
import { writeOwner } from '../lib/core/snapshot'
import { RETRY_MAX_MS } from '../lib/hub/convergence'
import { connect, gate, lines, redisFor, startApp, upload } from './helpers/index'

// Every loss is repaired in bounded time: a re-read that failed is tried again until it works
// (as soon as the command connection is back), and the safety sweep re-reads every unfinished
// watched job once per `sweepPeriodMs`, spread evenly, within its budget per job.

const log = { debug () {}, info () {}, warn () {}, error () {} } as any

t.test('a final whose re-read fails (the command connections killed and kept out) reaches the watcher once they are back', async (t) => {
  const redis = await redisFor(t)
  // The watcher's instance: no bridge (its own connections, all named, are the ones killed), no
  // sweep (it must not be what repairs the loss). The other instance relays.
  const watcher = await startApp(t, redis, { connection: { host: '127.0.0.1', port: redis.port, connectionName: 'jp-watcher' }, bridge: { enabled: false }, sweepPeriodMs: 0 })
  const relay = await startApp(t, redis, { uploadDir: watcher.uploadDir, sweepPeriodMs: 0 })
  const up = await upload(`${watcher.url}/batch/upload`, lines(2))
  const jobId: string = up.body.job_id
  const cookie = up.cookie as string
  const hold = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(watcher.uploadDir) }, async (ctx) => {
    await ctx.report(1, 2)
    await hold.promise
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    hold.open()
    await worker.close()
  })
  const watched = connect(t, `${watcher.ws}/ws/batch/${jobId}`, { cookie })
  const witness = connect(t, `${relay.ws}/ws/batch/${jobId}`, { cookie })
  await watched.waitFor(m => m.processed === 1)
  await witness.waitFor(m => m.processed === 1)

  // The watcher's command connections go (the subscriber stays) and cannot come back.
  const control = redis.client()
  t.teardown(() => control.disconnect())
  const list = String(await control.client('LIST')).split('\n').filter(Boolean)
  const mine = list.filter(l => / name=jp-watcher /.test(l) && / sub=0 /.test(l) && / psub=0 /.test(l))
  t.ok(mine.length >= 2, `the watcher's command connections: ${mine.length}`)
  const maxclients = (await control.config('GET', 'maxclients') as string[])[1]
  await control.config('SET', 'maxclients', String(list.length - mine.length))
  t.teardown(async () => await control.config('SET', 'maxclients', maxclients))
  for (const line of mine) await control.client('KILL', 'ID', (/\bid=(\d+)/.exec(line) as RegExpExecArray)[1])

  // The final is relayed while the watcher cannot read: its re-read fails.
  hold.open()
  await witness.waitFor(m => m.status === 'complete')
  t.notOk(watched.messages.some(m => m.status === 'complete'), 'no final without a read')

  const back = Date.now()
  await control.config('SET', 'maxclients', maxclients)
  // ioredis waits at most 2 s between reconnects; then the owed re-read runs at once.
  const final = await watched.waitFor(m => m.status === 'complete', 10_000)
  const ms = Date.now() - back
  t.match(final, { status: 'complete', processed: 2, total: 2 })
  t.ok(ms <= 2_000 + RETRY_MAX_MS, `the final ${ms} ms after the connections could come back (bound: their reconnect, at most 2 s, then a read)`)
  await watched.closed
})

t.test('messages lost (no bridge at all): the sweep brings every watcher its final within sweepPeriodMs', async (t) => {
  const redis = await redisFor(t)
  const PERIOD = 1_000
  const { url, ws, uploadDir } = await startApp(t, redis, { bridge: { enabled: false }, sweepPeriodMs: PERIOD })
  const hold = gate()
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir), workerOptions: { concurrency: 10 } }, async () => {
    await hold.promise
    return { ok: true }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    hold.open()
    await worker.close()
  })
  let cookie: string | undefined
  const clients = []
  for (let i = 0; i < 10; i++) {
    const up = await upload(`${url}/batch/upload`, lines(1), { cookie })
    cookie = up.cookie
    clients.push(connect(t, `${ws}/ws/batch/${up.body.job_id as string}`, { cookie }))
  }
  await Promise.all(clients.map(async c => await c.waitFor(m => m.status === 'processing')))
  let done = 0
  const allDone = gate()
  worker.on('completed', () => { if (++done === 10) allDone.open() })
  hold.open()
  await allDone.promise
  const ended = Date.now()
  const finals = await Promise.all(clients.map(async c => { await c.waitFor(m => m.status === 'complete', 5_000); return Date.now() - ended }))
  const worst = Math.max(...finals)
  t.ok(worst <= PERIOD + 250, `every final within the period: the last ${worst} ms after the jobs ended (period ${PERIOD} ms)`)
})

t.test('the sweep covers every watched job once per period, spread evenly, at 1/period reads per job', async (t) => {
  const redis = await redisFor(t)
  const PERIOD = 1_000
  const N = 30
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const cmd = redis.client()
  const subscriber = redis.client()
  const monitoring = redis.client()
  const monitor = await monitoring.monitor()
  const queue = new Queue('sweepq', { connection: { host: '127.0.0.1', port: redis.port } })
  const hub = new Hub({ redis: cmd, subscriber, keys, throttleMs: 0, sweepPeriodMs: PERIOD, log })
  t.teardown(async () => {
    hub.close()
    await queue.close()
    cmd.disconnect()
    subscriber.disconnect()
    monitor.disconnect()
    monitoring.disconnect()
  })
  const ids: string[] = []
  for (let i = 0; i < N; i++) {
    const jobId = randomUUID()
    await queue.add('j', { owner: 'alice' }, { jobId })
    await writeOwner(cmd, keys, 'sweepq', jobId, 'alice')
    ids.push(jobId)
  }
  const sink = { deliver () {} }
  const opened = await Promise.all(ids.map(async id => await hub.open({ kind: 'k', queue: 'sweepq', jobId: id })))
  for (const o of opened) o?.attach(sink)
  t.teardown(() => { for (const o of opened) o?.detach(sink) })

  // Each job read is one GET of its cancellation mark inside the snapshot script.
  const reads = new Map<string, number[]>(ids.map(id => [id, []]))
  let scripts = 0
  // Counted from a marker the monitor sees after the opens' own reads, not before.
  let start = Infinity
  const WINDOW = 3 * PERIOD
  const watched = gate()
  const marker = `window-${randomUUID()}`
  monitor.on('monitor', (_time: string, args: string[]) => {
    const now = Date.now()
    if (args[0]?.toLowerCase() === 'echo' && args[1] === marker) start = now
    if (now < start) return
    if (now - start > WINDOW) return watched.open()
    if (args[0]?.toLowerCase() === 'evalsha' || args[0]?.toLowerCase() === 'eval') scripts++
    if (args[0]?.toLowerCase() === 'get' && args[1]?.endsWith(':jp-cancel')) reads.get(args[1].split(':')[2])?.push(now)
  })
  await cmd.echo(marker)
  // Wakes the monitor after the window even if nothing else runs.
  const waker = setInterval(() => { void cmd.ping().catch(() => {}) }, 100)
  t.teardown(() => clearInterval(waker))
  await watched.promise
  clearInterval(waker)

  let worstGap = 0
  let total = 0
  for (const [id, times] of reads) {
    total += times.length
    // From the window's start (every job was read by its open just before) to its end.
    const points = [start, ...times, start + WINDOW]
    for (let i = 1; i < points.length; i++) worstGap = Math.max(worstGap, points[i] - points[i - 1])
    t.ok(times.length >= 2, `job ${id.slice(0, 8)} read ${times.length} times in ${WINDOW} ms`)
  }
  // Half a period of slack: a loaded machine delays timers by hundreds of ms; a sweep that
  // missed a job for a round would show a gap of two periods.
  t.ok(worstGap <= PERIOD * 1.5, `no job waits much more than the period for a read: worst gap ${worstGap} ms (period ${PERIOD} ms)`)
  const perJobPerSecond = total / N / (WINDOW / 1000)
  t.ok(perJobPerSecond <= 1.2 * (1000 / PERIOD), `reads per watched job per second: ${perJobPerSecond.toFixed(3)} (1/period = ${(1000 / PERIOD).toFixed(3)})`)
  t.ok(scripts <= total, `script calls ${scripts} for ${total} job reads`)
  // Spread evenly: no tenth of a period has more than its share (plus one step's rounding).
  const all = [...reads.values()].flat().sort((a, b) => a - b)
  let burst = 0
  for (let i = 0, j = 0; i < all.length; i++) {
    while (all[i] - all[j] > PERIOD / 10) j++
    burst = Math.max(burst, i - j + 1)
  }
  // Spread, not all at once: a sweep reading every job in one go would put all N in one slice;
  // a stalled event loop can bunch a few slices' reads together, hence up to half of N.
  t.ok(burst <= Math.ceil(N / 2), `at most ${burst} reads in any ${PERIOD / 10} ms (share ${N / 10}, limit ${Math.ceil(N / 2)} of ${N})`)
  // The same sweep at the default period costs each watched job 1/600 reads per second.
  const atDefault = perJobPerSecond * PERIOD / 600_000
  t.ok(atDefault <= 0.01, `at the default period: ${atDefault.toFixed(5)} commands per second per watched job (budget 0.01)`)
})
