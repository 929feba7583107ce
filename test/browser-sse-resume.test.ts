import t from 'tap'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { browserPage, startNginx, until, watchJobs } from './helpers/browser'
import { Cluster, type Api } from './helpers/cluster'
import { eventually } from './helpers/index'

// The client in real Chromium on its SSE transport (nginx refuses the WebSocket upgrade), through
// nginx to 2 API instances of the example and a worker. The instance serving the stream is killed
// mid-job: the client resumes on the other instance with Last-Event-ID and still gets the final
// state. nginx logs each /events request with its Last-Event-ID and the instance that served it.

interface LogLine { status: number, upstreams: string[], lastEventId: string, uri: string }

const parseLog = (text: string): LogLine[] => text.split('\n').filter(Boolean).map(line => {
  const m = /^\S+ (\d+) (.*) "(.*)" (\S+)$/.exec(line)
  if (m === null) throw new Error(`unexpected nginx log line: ${line}`)
  // nginx writes an absent header as `-`.
  return { status: Number(m[1]), upstreams: m[2].split(', '), lastEventId: m[3] === '-' ? '' : m[3], uri: m[4] }
})

t.test('SSE: the instance serving the stream is killed mid-job; the client resumes with Last-Event-ID on the other', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 1, env: { ITEM_DELAY_MS: '20' } })
  const nginx = await startNginx(t, cluster.apis)
  await writeFile(join(nginx.flags, 'block-ws'), '')
  const page = await browserPage(t, nginx.url)

  // No WebSocket probes while it runs (they would be refused anyway): SSE carries it all.
  await watchJobs(page, 'resume', { backoff: { minMs: 200, maxMs: 1000 }, upgradeIntervalMs: 600_000 }, 1, 300)
  await until(page, 'resume', x => x.state.state === 'fallback' && x.state.transport === 'sse', 20_000)
  const [jobId] = (await until(page, 'resume', x => x.ids.length === 1)).ids
  const processed = async (): Promise<number> => await page.evaluate((id) => (window as any).resume.c.watch('batch', id).current?.processed ?? 0, jobId)
  t.ok(await eventually(async () => await processed() >= 20, 20_000), 'the job runs and its progress arrives over SSE')

  let serving: Api | undefined
  await eventually(async () => {
    for (const api of cluster.apis) {
      const health = await (await fetch(`${api.url}/job-progress/health`)).json() as { sockets: number }
      if (health.sockets > 0) serving = api
    }
    return serving !== undefined
  })
  const other = cluster.apis.find(a => a !== serving) as Api
  const before = await processed()
  await serving?.proc.stop('SIGKILL')

  const x = await until(page, 'resume', x => x.results.length === 1, 30_000)
  t.match(x.results[0], { status: 'succeeded', processed: 300, result: { records: 300 } }, 'the final state, through the other instance')
  t.ok(before < 300, `killed mid-job (at ${before} of 300)`)
  t.ok(x.states.some(s => s.state === 'reconnecting' && s.transport === 'sse'), 'it said it was reconnecting, still on SSE')
  t.notOk(x.states.some(s => s.transport === 'websocket' && s.state === 'live'), 'never on WebSocket')

  // The resumed stream ends once the job has ended; nginx logs a request when it ends.
  let log: LogLine[] = []
  t.ok(await eventually(async () => {
    log = parseLog(await readFile(nginx.sseLog, 'utf8').catch(() => ''))
    return log.some(l => l.lastEventId !== '' && l.status === 200)
  }, 10_000), 'a resumed stream is in the log')
  t.equal(log[0].lastEventId, '', 'the first stream starts without Last-Event-ID')
  t.ok(log[0].upstreams.includes(`127.0.0.1:${serving?.port}`), 'the first stream was served by the killed instance')
  const resumed = log.filter(l => l.lastEventId !== '')
  t.ok(resumed.length >= 1, 'the client reconnected with Last-Event-ID')
  for (const l of resumed) {
    t.match(l.lastEventId, new RegExp(`^${jobId}@\\d+\\.\\d+-\\d+$`), 'Last-Event-ID names the job and the version last seen')
    t.match(l.uri, `jobs=${jobId}`, 'on the multiplexed stream of the watched job')
  }
  t.equal(resumed.at(-1)?.upstreams.at(-1), `127.0.0.1:${other.port}`, 'the resumed stream was served by the other instance')
})
