import t, { type Tap } from 'tap'
import { createHash } from 'node:crypto'
import { browserPage, startNginx } from './helpers/browser'
import { Cluster, type Api } from './helpers/cluster'
import { gate } from './helpers/index'
import { createJobWorker, DiskStorage } from '../lib/index'

// A 10 MB stream read in Chromium through nginx while the instance serving the page is killed:
// 2 API instances of the example (child processes), nginx running deploy/nginx.conf in front, the
// client the plugin serves, and a worker in this process writing 1 KB chunks. The page assembles
// what watch.stream yields; every chunk starts with its offset, and the frames on the wire are
// read too, so a lost, repeated or reordered chunk shows, on the wire or in the text.

const CHUNK = 1024
const COUNT = 10 * 1024
/** Chunk i: its offset, then bytes that depend on it, CHUNK characters in all. */
const chunk = (i: number): string => `${String(i).padStart(7, '0')}:`.padEnd(CHUNK, String.fromCharCode(97 + (i % 26)))
const expected = createHash('sha256')
for (let i = 0; i < COUNT; i++) expected.update(chunk(i))
const expectedHash = expected.digest('hex')

t.test('a 10 MB stream in Chromium, the serving instance SIGKILLed mid-stream: every chunk once, in order', async (t) => {
  const cluster = await Cluster.start(t, { apis: 2, workers: 0 })
  const nginx = await startNginx(t, cluster.apis)
  const page = await browserPage(t, nginx.url)

  // Each job's worker writes half the stream, then waits until the page is in the middle of it.
  const halves = new Map<string, ReturnType<typeof gate>>()
  const halfOf = (jobId: string): ReturnType<typeof gate> => {
    let half = halves.get(jobId)
    if (half === undefined) halves.set(jobId, half = gate())
    return half
  }
  const worker = createJobWorker({ kind: 'batch', connection: cluster.redis.url, storage: new DiskStorage(cluster.uploadDir) }, async (ctx) => {
    const out = ctx.stream('out')
    for (let i = 0; i < COUNT; i++) {
      if (i === COUNT / 2) await halfOf(ctx.job.id as string).promise
      await out.write(chunk(i))
    }
    await out.end()
    return { chunks: COUNT }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    for (const half of halves.values()) half.open()
    await worker.close()
  })

  // Every stream chunk's offset in the WebSocket frames the page received, over every connection.
  const wire: number[] = []
  page.on('websocket', ws => ws.on('framereceived', ({ payload }) => {
    const text = String(payload)
    if (!text.startsWith('{"type":"stream"')) return
    wire.push(JSON.parse(text).offset)
  }))

  const run = async (t: Tap.Test, transport: 'websocket' | 'sse'): Promise<string> => {
    const jobId: string = await page.evaluate(async (transport) => {
      const { JobProgressClient } = (window as any).JP
      const c = new JobProgressClient({ wsPath: '/api/v1/ws/jobs', transports: [transport], backoff: { minMs: 100, maxMs: 500 } })
      const job = await c.upload('batch', new Blob(['r0\nr1']), { filename: 'stream.txt' })
      const s = { c, count: 0, length: 0, disorder: [] as number[][], hash: '', parts: [] as string[], ended: false, error: '', final: '' }
      ;(window as any).S = s
      const w = c.watch('batch', job.jobId)
      void w.done.then((u: any) => { s.final = u.status }, (e: any) => { s.final = `${e.name as string}: ${e.message as string}` })
      void (async () => {
        try {
          for await (const chunk of w.stream('out')) {
            const at = Number(chunk.slice(0, 7))
            if (at !== s.count && s.disorder.length < 10) s.disorder.push([s.count, at])
            s.count++
            s.length += chunk.length
            s.parts.push(chunk)
          }
          const bytes = new TextEncoder().encode(s.parts.join(''))
          s.hash = [...new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))].map(b => b.toString(16).padStart(2, '0')).join('')
        } catch (err: any) {
          s.error = String(err?.stack ?? err)
        }
        s.ended = true
      })()
      return job.jobId
    }, transport)
    const half = halfOf(jobId)

    // Mid-stream: a quarter read; the writer goes on as the instance dies.
    await page.waitForFunction((n) => (window as any).S.count >= n, COUNT / 4, { timeout: 60_000, polling: 20 })
    let serving: Api | undefined
    for (const api of cluster.apis) {
      const health = await (await fetch(`${api.url}/job-progress/health`)).json() as { sockets: number }
      if (health.sockets > 0) serving = api
    }
    if (serving === undefined) throw new Error('no instance holds the page\'s connection')
    const read: number = await page.evaluate(() => (window as any).S.count)
    half.open()
    await serving.proc.stop('SIGKILL')
    t.ok(read >= COUNT / 4 && read <= COUNT / 2, `killed mid-stream (${read} of ${COUNT} chunks read, the writer going on)`)

    await page.waitForFunction(() => (window as any).S.ended, undefined, { timeout: 60_000, polling: 50 })
    const s = await page.evaluate(() => { const s = (window as any).S; return { count: s.count, length: s.length, disorder: s.disorder, hash: s.hash, error: s.error, connections: s.c.connections } })
    t.equal(s.error, '', 'the iterator ended without an error')
    t.ok(s.connections >= 2, `reconnected (${s.connections as number} connections)`)
    t.equal(s.count, COUNT, 'every chunk')
    t.same(s.disorder, [], 'each in order, once: chunk n starts with n')
    t.equal(s.length, COUNT * CHUNK)
    t.equal(s.hash, expectedHash, 'the text assembled is what the worker wrote')
    await page.waitForFunction(() => (window as any).S.final !== '', undefined, { timeout: 30_000, polling: 50 })
    t.equal(await page.evaluate(() => (window as any).S.final), 'succeeded', 'the job\'s final state, through the other instance')
    await page.evaluate(() => (window as any).S.c.close())
    // Back to two instances, on the port nginx knows.
    cluster.apis.splice(cluster.apis.indexOf(serving), 1)
    await cluster.startApi(serving.port)
    return jobId
  }

  let jobId = ''
  await t.test('over WebSocket', async (t) => {
    jobId = await run(t, 'websocket')
    t.same(wire, Array.from({ length: COUNT }, (_, i) => i), 'on the wire too: each offset once, in order, across the connections')
  })
  await t.test('over SSE', async (t) => { await run(t, 'sse') })

  // The stream read after the job ended, and somebody else's session gets what a missing job gets.
  const tail = await page.evaluate(async (id) => await (await fetch(`/batch/${id}/streams/out?from=${10 * 1024 - 2}`)).json(), jobId)
  t.match(tail, { job_id: jobId, name: 'out', count: COUNT, from: COUNT - 2, next: COUNT, end: { reason: 'done', offset: COUNT } }, 'read after the job ended')
  t.same(tail.chunks, [chunk(COUNT - 2), chunk(COUNT - 1)])
  const other = await page.context().browser()?.newContext()
  t.teardown(async () => await other?.close())
  const stranger = await (other as NonNullable<typeof other>).newPage()
  await stranger.goto(`${nginx.url}/`)
  await stranger.addScriptTag({ type: 'module', content: "import * as client from '/job-progress/client.js'; window.JP = client" })
  await stranger.waitForFunction(() => (window as any).JP !== undefined)
  const foreign = await stranger.evaluate(async (id) => {
    // An upload of its own starts the stranger's session (of a kind nobody works on here).
    const c = new (window as any).JP.JobProgressClient({ wsPath: '/api/v1/ws/jobs' })
    await c.upload('dataset', new Blob(['r0']), { filename: 'mine.txt' })
    c.close()
    const res = await fetch(`/batch/${id}/streams/out`)
    const missing = await fetch('/batch/00000000-0000-4000-8000-000000000000/streams/out')
    return { status: res.status, body: await res.json(), missingStatus: missing.status, missingBody: await missing.json() }
  }, jobId)
  t.equal(foreign.status, 404, 'another owner: not found')
  t.same(foreign.body, foreign.missingBody, 'answered as for a job that does not exist')
})
