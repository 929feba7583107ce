import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { WebSocketServer, type WebSocket } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The floor of the subscribe storm for any design that sends a job's events on its own channel
 * and keeps guarantee 1 (the channel SUBSCRIBEd before the job is read, on another connection):
 * a bare `ws` server on the `jobs` protocol's path whose subscribes of one turn cost ONE
 * SUBSCRIBE for their channels, then one pipelined owner read per job (the job's data in the
 * BullMQ hash, as Socket.IO's peer reads it), then the first message. A map of channel to
 * sockets, one channel per job and one kind; nothing else: no snapshot (state, progress, the
 * stream's last entry), no versions, no outbox, no limits, no heartbeats.
 */
const CONNECTED = '{"type":"connected"}'

interface Pending { ws: WebSocket, jobId: string }

async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queues: string[], backlog?: number }
  const redis = new Redis(cfg.redisUrl)
  const sub = redis.duplicate()
  redis.on('error', () => {})
  sub.on('error', () => {})
  const queue = cfg.queues[0]
  const watched = new Map<string, Set<WebSocket>>()
  const mine = new WeakMap<WebSocket, string[]>()
  let batch: Pending[] = []

  const flush = (): void => {
    const opens = batch
    batch = []
    const channels = opens.map(o => `jp:${queue}:{${o.jobId}}`)
    sub.subscribe(...channels).then(async () => {
      const pipeline = redis.pipeline()
      for (const o of opens) pipeline.hget(`bull:${queue}:${o.jobId}`, 'data')
      const reads = await pipeline.exec() ?? []
      opens.forEach((o, i) => {
        const data = reads[i]?.[1] as string | null
        const channel = channels[i]
        if (data === null || (JSON.parse(data) as { owner?: string }).owner !== 'bench' || o.ws.readyState !== 1) return
        let sockets = watched.get(channel)
        if (sockets === undefined) watched.set(channel, sockets = new Set())
        sockets.add(o.ws)
        mine.get(o.ws)?.push(channel)
        o.ws.send(`{"type":"job_update","job_id":"${o.jobId}","state":"queued"}`)
      })
    }).catch(() => {})
  }

  const server = createServer()
  const wss = new WebSocketServer({ server, path: '/ws/jobs' })
  wss.on('connection', (ws: WebSocket) => {
    mine.set(ws, [])
    ws.send(CONNECTED)
    ws.on('message', (data) => {
      const m = JSON.parse(String(data)) as { action?: string, job_id?: string }
      if (m.action !== 'subscribe' || typeof m.job_id !== 'string') return
      if (batch.length === 0) setImmediate(flush)
      batch.push({ ws, jobId: m.job_id })
    })
    ws.on('close', () => {
      const gone: string[] = []
      for (const channel of mine.get(ws) ?? []) {
        const sockets = watched.get(channel)
        sockets?.delete(ws)
        if (sockets?.size === 0) {
          watched.delete(channel)
          gone.push(channel)
        }
      }
      if (gone.length > 0) sub.unsubscribe(...gone).catch(() => {})
    })
  })
  sub.on('message', (channel: string, message: string) => {
    for (const ws of watched.get(channel) ?? []) ws.send(message)
  })
  await new Promise<void>(resolve => server.listen({ port: 0, host: '0.0.0.0', backlog: cfg.backlog ?? 8192 }, resolve))
  const { port } = server.address() as { port: number }
  serve(commonHandlers(async () => {
    for (const ws of wss.clients) ws.terminate()
    await new Promise(resolve => server.close(resolve))
    redis.disconnect()
    sub.disconnect()
  }), { port })
}

main().catch((err) => {
  process.stderr.write(`storm floor server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
