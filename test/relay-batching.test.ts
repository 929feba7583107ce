import t from 'tap'
import Fastify from 'fastify'
import { Bridge } from '../lib/bridge/bridge'
import { Keys } from '../lib/core/keys'
import { redisFor } from './helpers/index'

t.test('under load the ordered relay waits a little after a round that read several entries, so the next takes a batch', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  const blocking = redis.client()
  const writer = redis.client()
  const watcher = redis.client()
  const monitor = await watcher.monitor()
  t.teardown(() => { r.disconnect(); blocking.disconnect(); writer.disconnect(); monitor.disconnect(); watcher.disconnect() })
  const keys = new Keys({ prefix: 'bull', channelPrefix: 'jp' })
  const stream = keys.queueKey('batch', 'events')
  // The periodic check (which also runs the script) is kept out of the window.
  const bridge = new Bridge({ redis: r, blocking, keys, queues: ['batch'], group: 'jp-bridge', consumer: 'me', blockMs: 50, claimIdleMs: 60_000, claimIntervalMs: 60_000, consumerIdleMs: 60_000, log: Fastify().log })
  t.teardown(async () => await bridge.close())
  await bridge.start()
  // Each relay script run, when Redis ran it (s), and the PUBLISHes it made.
  const runs: Array<{ at: number, published: number }> = []
  monitor.on('monitor', (time: string, args: string[]) => {
    const name = String(args[0]).toLowerCase()
    if (name === 'evalsha' || name === 'eval') runs.push({ at: Number(time), published: 0 })
    else if (name === 'publish' && runs.length > 0) runs[runs.length - 1].published++
  })
  // 300 events two at a time, as fast as one connection writes them: Redis serves the relay's
  // wake-up once it has read both, so every round reads two entries at least.
  for (let i = 0; i < 300; i += 2) {
    const pair = writer.pipeline()
    for (const k of [i, i + 1]) pair.xadd(stream, '*', 'event', 'progress', 'jobId', `j${k % 7}`, 'data', String(k))
    await pair.exec()
  }
  const deadline = Date.now() + 10_000
  while (bridge.published < 300 && Date.now() < deadline) await new Promise(resolve => setTimeout(resolve, 20))
  t.equal(bridge.published, 300, 'every event relayed')
  const busy = runs.slice(0, -1).map((run, i) => ({ ...run, gapMs: (runs[i + 1].at - run.at) * 1000 })).filter(run => run.published > 1)
  t.ok(busy.length > 0, `${busy.length} of ${runs.length} runs read several entries`)
  // Without the pause the next run follows at once (the wake-up returns with the entries that
  // arrived): a round trip, well under a millisecond on loopback.
  const short = busy.filter(run => run.gapMs < 1)
  t.equal(short.length, 0, `after a run that read several entries the next waits (shortest gap ${Math.min(...busy.map(run => run.gapMs)).toFixed(2)} ms)`)
  // Without it every pair is a round of its own.
  t.ok(runs.length < 300 / 2, `${runs.length} runs of the relay script for 150 pairs of events`)
})
