import t from 'tap'
import { jobsProtocol } from '../lib/index'
import type { Labels, MetricName, Telemetry } from '../lib/core/telemetry'
import { connect, redisFor, startApp, upload } from './helpers/index'

// A socket that subscribes many jobs at once does not open them one after the other: its opens
// run side by side, so their snapshot reads share pipelined batches (a few round trips for the
// lot, not a few per job). An unsubscribe still orders what follows it.

const PATH = '/ws/jobs'

t.test('100 subscribes sent at once: read in a few pipelined batches, every job answered once', async (t) => {
  const batches: number[] = []
  const telemetry: Telemetry = {
    count (name: MetricName, labels: Labels = {}, n = 1) {
      if (name === 'snapshotReads' && labels.reason === 'open') batches.push(n)
    },
    observe () {},
    gauge () {}
  }
  const redis = await redisFor(t)
  const { url, ws } = await startApp(t, redis, { telemetry, protocols: [jobsProtocol({ path: PATH })] })
  const first = await upload(`${url}/batch/upload`, '1\n')
  const ids = [String(first.body.job_id)]
  for (let i = 1; i < 100; i++) ids.push(String((await upload(`${url}/batch/upload`, '1\n', { cookie: first.cookie })).body.job_id))

  const client = connect(t, `${ws}${PATH}`, { cookie: first.cookie })
  await client.waitFor(m => m.type === 'connected')
  for (const id of ids) client.send({ action: 'subscribe', job_id: id })
  await client.waitFor(() => new Set(client.messages.filter(m => m.type === 'job_update').map(m => m.job_id)).size === 100, 20_000)
  t.equal(batches.reduce((a, b) => a + b, 0), 100, 'one snapshot read per job')
  t.ok(batches.length <= 10, `100 opens read in ${batches.length} pipelined batches (one after the other: 100)`)

  // An unsubscribe then a subscribe of the same job: answered in that order.
  client.send({ action: 'unsubscribe', job_id: ids[0] })
  client.send({ action: 'subscribe', job_id: ids[0] })
  const seen = client.messages.length
  await client.waitFor(m => client.messages.indexOf(m) >= seen && m.type === 'subscribed' && m.job_id === ids[0])
  const order = client.messages.slice(seen).filter(m => m.job_id === ids[0]).map(m => m.type)
  t.same(order.slice(0, 2), ['unsubscribed', 'subscribed'])
})
