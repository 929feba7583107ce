import { QueueEvents } from 'bullmq'
import { createServer } from 'node:http'
import { WebSocketServer, type WebSocket } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The floor: one QueueEvents per process writing every progress event straight to the `ws`
 * sockets of its job. No ownership, snapshot, ordering or slow-client handling: the least work
 * that can move an event from BullMQ to a socket.
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queue: string }
  const sockets = new Map<string, Set<WebSocket>>()
  const server = createServer((_req, res) => { res.writeHead(404).end() })
  const wss = new WebSocketServer({ server })
  wss.on('connection', (ws, req) => {
    const jobId = (req.url ?? '').split('/').pop() as string
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
  const url = new URL(cfg.redisUrl)
  const events = new QueueEvents(cfg.queue, { connection: { host: url.hostname, port: Number(url.port) } })
  events.on('error', () => {})
  events.on('progress', ({ jobId, data }) => {
    const set = sockets.get(jobId)
    if (set === undefined) return
    const { processed, total } = data as { processed: number, total: number }
    const message = JSON.stringify({ job_id: jobId, status: 'processing', progress: total > 0 ? Math.round(processed / total * 1000) / 10 : 0, processed, total, eta_seconds: null })
    for (const ws of set) ws.send(message)
  })
  await events.waitUntilReady()
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  serve(commonHandlers(async () => {
    for (const ws of wss.clients) ws.terminate()
    await events.close()
    await new Promise(resolve => server.close(resolve))
  }), { port })
}

main().catch((err) => {
  process.stderr.write(`floor server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
