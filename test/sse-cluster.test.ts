import t from 'tap'
import { lines, upload } from './helpers/index'
import { Cluster } from './helpers/cluster'
import { sse } from './helpers/sse'

// SSE across real processes: 2 API instances of the example, a worker, nginx with
// deploy/nginx.conf in front.

t.test('through nginx the stream is not buffered; after a SIGKILL of its instance, Last-Event-ID on the other resumes to the final state', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, nginx: true, env: { ITEM_DELAY_MS: '40' } })
  const nginx = cluster.nginx as NonNullable<typeof cluster.nginx>
  const [a, b] = cluster.apis
  const up = await upload(`${nginx.url}/batch/upload`, lines(60))
  const jobId = up.body.job_id

  // Through nginx: progress arrives while the job runs, not in one lump at its end.
  const proxied = await sse(t, `${nginx.url}/batch/${jobId}/events`, { cookie: up.cookie })
  t.equal(proxied.status, 200)
  const early = await proxied.waitFor(e => e.data?.status === 'running' && e.data.processed > 0 && e.data.processed < 60, 20_000)
  t.ok(early.data.processed < 60, `progress ${early.data.processed}/60 arrived through nginx while the job ran`)

  // Straight to instance A, then A is killed mid-job.
  const direct = await sse(t, `${a.url}/batch/${jobId}/events`, { cookie: up.cookie })
  const seen = await direct.waitFor(e => e.data?.processed >= 5, 20_000)
  await a.proc.stop('SIGKILL')
  await direct.ended
  t.notOk(direct.events.some(e => e.data?.status === 'succeeded'), 'A died before the end')
  const lastId = direct.events.filter(e => e.id !== undefined).at(-1)?.id as string
  t.ok(lastId.startsWith(`${jobId}@`))

  // What an EventSource does: the same URL again (here the other instance) with Last-Event-ID.
  const resumed = await sse(t, `${b.url}/batch/${jobId}/events`, { cookie: up.cookie, 'last-event-id': lastId })
  t.equal(resumed.status, 200)
  const snapshot = await resumed.waitFor(e => e.event === 'job_update')
  t.ok(snapshot.data.processed >= seen.data.processed, 'the first event on B is the current state, not older than what A sent')
  const final = await resumed.waitFor(e => e.data?.status === 'succeeded', 30_000)
  t.match(final.data, { processed: 60, total: 60, result: { records: 60 } })
  await resumed.waitFor(e => e.event === 'close')
})
