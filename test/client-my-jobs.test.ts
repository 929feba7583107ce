import t from 'tap'
import { Redis } from 'ioredis'
import WebSocket from 'ws'
import { AuthError, HttpError, JobProgressClient, type MyJob, type MyJobs } from '../client/index'
import { jobsProtocol } from '../lib/index'
import { eventually, gate, lines, redisFor, startApp, startWorker, uploadAs } from './helpers/index'

// client.myJobs() in Node against a real server: the caller's list, then the feed's changes live,
// read again after a reconnect so that a change made while the connection was down is not lost;
// filters; nobody else's jobs. On each transport: the WebSocket's subscribe_mine, the SSE feed
// stream, and polling (the list read each round).

const FEED = /^\/(ws\/jobs|job-progress\/jobs\/events)/

for (const transport of ['websocket', 'sse', 'polling'] as const) {
  t.test(`${transport}: the list, then live changes; a change made while disconnected is there after the reconnect; filters; only the caller's jobs`, async (t) => {
    const redis = await redisFor(t)
    // Holds the feed's connections (WebSocket upgrade, SSE feed) while closed, so a change can be made while the client is away.
    let hold: ReturnType<typeof gate> | null = null
    let held = 0
    // A short grace: a connection the client's pool opened and left empty (a fetch aborted while
    // it was being made) is destroyed 1 s after it, so a close that races one takes 1.5 s, not 11 s.
    const s = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice', 'key-bob': 'bob' }, protocols: [jobsProtocol()], heartbeatIntervalMs: 500, uploads: { shutdownGraceMs: 500 } }, (app) => {
      app.addHook('onRequest', async (req) => {
        if (hold === null || !FEED.test(req.url)) return
        held++
        await hold.promise
      })
    })
    const before = await uploadAs(s, 'key-alice')
    const bobs = new Set([await uploadAs(s, 'key-bob')])
    const c = new JobProgressClient({ baseUrl: s.url, apiKey: 'key-alice', transports: [transport], pollIntervalMs: 100, WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, backoff: { minMs: 50, maxMs: 200 } })
    t.teardown(() => c.close())
    const seen: MyJob[] = []
    const follow = (list: MyJobs): MyJobs => {
      list.onUpdate(jobs => seen.push(...jobs))
      t.teardown(() => list.close())
      return list
    }
    const all = follow(c.myJobs())
    const datasets = follow(c.myJobs({ kind: 'dataset' }))
    const active = follow(c.myJobs({ state: ['queued', 'running'] }))
    const status = (list: MyJobs, id: string): string | undefined => list.jobs.find(j => j.jobId === id)?.status
    // Every list the iterator yields, until the list is closed.
    const yielded: MyJob[][] = []
    const iterating = (async () => { for await (const jobs of all) yielded.push(jobs) })()

    t.ok(await eventually(() => all.ready && datasets.ready && active.ready, 10_000), 'read')
    t.same(all.jobs.map(j => j.jobId), [before], 'the caller\'s job, not the other owner\'s')
    t.match(all.jobs[0], { kind: 'batch', status: 'queued', progress: 0, createdAt: Number })
    t.same(datasets.jobs, [], 'kind filter')

    const added = await uploadAs(s, 'key-alice')
    const dataset = await uploadAs(s, 'key-alice', 'dataset')
    bobs.add(await uploadAs(s, 'key-bob', 'dataset'))
    t.ok(await eventually(() => status(all, added) === 'queued' && status(all, dataset) === 'queued'), 'new jobs appear live')
    t.same(all.jobs.map(j => j.jobId), [dataset, added, before], 'newest first')
    t.ok(await eventually(() => status(datasets, dataset) === 'queued'))
    t.same(datasets.jobs.map(j => j.jobId), [dataset], 'the dataset list has the dataset job only')

    startWorker(t, redis, 'batch', s.uploadDir)
    t.ok(await eventually(() => status(all, before) === 'succeeded' && status(all, added) === 'succeeded', 10_000), 'jobs completing are followed live')
    t.ok(await eventually(() => active.jobs.length === 1), 'a job leaving the state filter leaves that list')
    t.same(active.jobs.map(j => j.jobId), [dataset])

    // The server closes every connection; the feed's come back only once a job was created and ran meanwhile.
    hold = gate()
    const connections = c.connections
    // Polling holds no connection: its next round reads the list.
    if (transport !== 'polling') {
      for (const ws of s.app.websocketServer?.clients ?? []) ws.terminate()
      s.app.server.closeAllConnections()
      t.ok(await eventually(() => held > 0, 10_000), 'the client reconnects, and is held')
    }
    const whileAway = await uploadAs(s, 'key-alice', 'batch', lines(1))
    const r = new Redis(redis.url)
    t.teardown(async () => await r.quit())
    t.ok(await eventually(async () => (await r.hget(`bull:batch:${whileAway}`, 'finishedOn')) !== null, 10_000), 'it ran while the client was away')
    t.notOk(all.jobs.some(j => j.jobId === whileAway && j.status === 'succeeded' && transport !== 'polling'), 'not seen yet')
    hold.open()
    hold = null
    t.ok(await eventually(() => status(all, whileAway) === 'succeeded', 10_000), 'after the reconnect the list has it, finished')
    if (transport !== 'polling') t.ok(c.connections > connections, 'reconnected')
    const later = await uploadAs(s, 'key-alice')
    t.ok(await eventually(() => status(all, later) === 'succeeded', 10_000), 'and follows changes live again')

    t.notOk(seen.some(j => bobs.has(j.jobId)), 'no list ever had the other owner\'s jobs')
    t.ok(seen.length > 0)
    all.close()
    await iterating
    t.ok(yielded.length >= 3, 'the iterator yields the lists and ends at close')
    t.same(yielded.at(-1)?.map(j => j.jobId), all.jobs.map(j => j.jobId))
    datasets.close()
    active.close()
    t.ok(await eventually(() => c.state.state === 'idle'), 'no list open, nothing watched: no connection held')
    // Client first, then the app (the teardowns would close the worker first). Either order ends
    // within the grace + 1 s: the 70 s once seen on SSE was an empty pooled connection that the
    // server's close waited for (see lib/http/connections.ts).
    c.close()
    await s.app.close()
  })
}

t.test('wrong credentials: the list ends with AuthError, its iterator throws it', async (t) => {
  const redis = await redisFor(t)
  const s = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice' }, protocols: [jobsProtocol()] })
  const c = new JobProgressClient({ baseUrl: s.url, apiKey: 'nope', transports: ['sse'], backoff: { minMs: 50, maxMs: 200 } })
  t.teardown(() => c.close())
  const list = c.myJobs()
  await t.rejects((async () => { for await (const _ of list) void _ })(), AuthError)
  t.ok(list.error instanceof AuthError)
})

t.test('a server without my jobs: the list ends with HttpError 404 on every transport, and no connection is held for it', async (t) => {
  const redis = await redisFor(t)
  const s = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice' }, protocols: [jobsProtocol()], myJobs: { path: false } })
  for (const transport of ['websocket', 'sse', 'polling'] as const) {
    const c = new JobProgressClient({ baseUrl: s.url, apiKey: 'key-alice', transports: [transport], WebSocket: WebSocket as unknown as typeof globalThis.WebSocket, backoff: { minMs: 50, maxMs: 200 } })
    t.teardown(() => c.close())
    const list = c.myJobs()
    const error = await (async () => { for await (const _ of list) void _ })().catch((e: unknown) => e)
    t.ok(error instanceof HttpError || (transport === 'websocket' && error instanceof Error && /feed/.test(error.message)), `${transport}: ${String(error)}`)
    t.ok(await eventually(() => c.state.state === 'idle'), `${transport}: idle`)
  }
})
