import t from 'tap'
import { setTimeout as sleep } from 'node:timers/promises'
import { browserPage, startNginx, until, watchJobs } from './helpers/browser'
import { Cluster } from './helpers/cluster'

// Every API instance down for 20 s while a page watches a job through nginx: the client's
// reconnect attempts are spaced by its backoff, then it recovers the final state.

t.test('every instance down for 20 s: attempts spaced by the backoff, then recovery', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, env: { ITEM_DELAY_MS: '20' } })
  const nginx = await startNginx(t, cluster.apis)
  const page = await browserPage(t, nginx.url)
  // The default first wait (1 s) and a lower cap than the default 30 s, so recovery is seen soon.
  await watchJobs(page, 'down', { transports: ['websocket'], backoff: { minMs: 1000, maxMs: 8000 } }, 1, 600)
  await until(page, 'down', x => x.state.state === 'live')
  const ports = cluster.apis.map(a => a.port)
  await Promise.all(cluster.apis.map(async a => await a.proc.stop('SIGKILL')))
  cluster.apis.length = 0
  const downAt = Date.now()
  await sleep(20_000)
  await Promise.all(ports.map(async p => await cluster.startApi(p)))
  const x = await until(page, 'down', x => x.results.length === 1, 60_000)
  t.match(x.results[0], { status: 'succeeded', processed: 600 }, 'final state after recovery')
  const waits = x.states.filter(s => s.state === 'reconnecting' && s.at >= downAt - 1000 && s.at <= downAt + 20_000)
  // Full jitter draws each wait anywhere below its cap, so the count varies (about 8 on average,
  // 11 seen); a loop would make hundreds. The spacing is checked attempt by attempt below.
  t.ok(waits.length >= 3 && waits.length <= 16, `${waits.length} attempts in 20 s (not a loop, not given up)`)
  waits.forEach((s, i) => t.ok(s.retryInMs <= Math.min(8000, 1000 * 2 ** i), `wait ${i}: ${s.retryInMs} ms ≤ ${Math.min(8000, 1000 * 2 ** i)} ms`))
  for (let i = 1; i < waits.length; i++) {
    t.ok(waits[i].at - waits[i - 1].at >= waits[i - 1].retryInMs - 50, `attempt ${i} came after the wait announced before it`)
  }
})
