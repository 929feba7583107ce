import Fastify from 'fastify'
import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { WebSocketServer, type WebSocket } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The two servers of bench/streams.ts, one process each (`system` in BENCH_CONFIG):
 * - plugin: a Fastify app with the plugin, one kind, the `jobs` protocol at /ws/jobs, the owner
 *   from an `x-owner` header; watchers subscribe with `streams`. Everything else is the default.
 * - floor: one connection reading ONE Redis stream (`XREAD BLOCK`) that the writer XADDs every
 *   chunk to, each entry written straight to the `ws` sockets of its job (`/<jobId>`): no
 *   ownership, catch-up, offsets kept, slow-reader handling or per-job keys.
 */
interface Config { system: 'plugin' | 'floor', redisUrl: string, queue: string, uploadDir: string, floorKey: string }

async function plugin (cfg: Config): Promise<void> {
  const { jobProgress, jobsProtocol } = await import(process.env.BENCH_LIB ?? '../../lib/index') as typeof import('../../lib/index')
  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection: cfg.redisUrl,
    kinds: { bench: { queueName: cfg.queue } },
    getOwner: (request) => request.headers['x-owner'] as string | undefined,
    throttleMs: 0,
    maxConnectionsPerOwner: 1_000_000,
    uploadDir: cfg.uploadDir,
    protocols: [jobsProtocol({ path: '/ws/jobs' })]
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  serve({
    ...commonHandlers(async () => { await app.close() }),
    // Jobs that only hold streams: waiting in the queue, owned by `owner`.
    enqueue: async ({ n, owner }: { n: number, owner: string }) => {
      const ids: string[] = []
      for (let i = 0; i < n; i++) ids.push((await app.jobProgress.enqueue('bench', { data: {}, owner })).jobId)
      return ids
    }
  }, { port })
}

async function floor (cfg: Config): Promise<void> {
  const sockets = new Map<string, Set<WebSocket>>()
  const server = createServer((_req, res) => { res.writeHead(404).end() })
  const wss = new WebSocketServer({ server })
  wss.on('connection', (ws, req) => {
    const jobId = (req.url ?? '').slice(1)
    let set = sockets.get(jobId)
    if (set === undefined) sockets.set(jobId, set = new Set())
    set.add(ws)
    ws.on('error', () => {})
    ws.on('close', () => {
      set.delete(ws)
      if (set.size === 0) sockets.delete(jobId)
    })
    ws.send('{"ready":true}')
  })
  const reader = new Redis(cfg.redisUrl, { maxRetriesPerRequest: null })
  reader.on('error', () => {})
  let closed = false
  let last = '$'
  const loop = (async () => {
    for (;;) {
      if (closed) return
      const reply = await reader.xread('COUNT', 1000, 'BLOCK', 1000, 'STREAMS', cfg.floorKey, last).catch(() => null)
      if (reply === null) continue
      for (const [id, fields] of reply[0][1]) {
        last = id
        // Fields as the writer puts them: j <jobId> o <offset> c <chunk as JSON>.
        const set = sockets.get(fields[1])
        if (set === undefined) continue
        const message = `{"job_id":"${fields[1]}","offset":${fields[3]},"chunk":${fields[5]}}`
        for (const ws of set) ws.send(message)
      }
    }
  })()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  serve(commonHandlers(async () => {
    closed = true
    for (const ws of wss.clients) ws.terminate()
    reader.disconnect()
    await loop
    await new Promise(resolve => server.close(resolve))
  }), { port })
}

const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as Config
;(cfg.system === 'plugin' ? plugin(cfg) : floor(cfg)).catch((err) => {
  process.stderr.write(`${cfg.system} stream server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
