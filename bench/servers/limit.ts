import { QueueEvents } from 'bullmq'
import { createServer } from 'node:http'
import type { Socket } from 'node:net'
import WebSocketModule, { WebSocketServer, type WebSocket } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The limit: the floor's read (one QueueEvents per process) with the least work that can put an
 * event on its sockets. Each event's message is built and framed once (an unmasked text frame,
 * as `ws` would build it), and each socket gets its frames of one turn of the event loop in one
 * write: one frame is written as it is, several are corked together, as the plugin's frame
 * writer does. No ownership, snapshot, ordering or slow-client handling: what the saturation
 * ramp reaches here is what this machine can deliver, the ceiling the plugin is measured against.
 */
const Sender = (WebSocketModule as unknown as { Sender: { frame: (data: Buffer, options: object) => Buffer[] } }).Sender
const TEXT_FRAME = { fin: true, opcode: 1, mask: false, readOnly: false, rsv1: false }

function frameText (payload: Buffer): Buffer {
  const parts = Sender.frame(payload, TEXT_FRAME)
  return parts.length === 1 ? parts[0] : Buffer.concat(parts, parts[0].length + payload.length)
}

/** A socket's frames of this turn. */
interface Held { socket: Socket, frames: Buffer[] }

async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queue: string }
  const sockets = new Map<string, Set<Held>>()
  const server = createServer((_req, res) => { res.writeHead(404).end() })
  const wss = new WebSocketServer({ server, perMessageDeflate: false })
  wss.on('connection', (ws: WebSocket, req) => {
    const jobId = (req.url ?? '').split('/').pop() as string
    let set = sockets.get(jobId)
    if (set === undefined) sockets.set(jobId, set = new Set())
    const held: Held = { socket: (ws as unknown as { _socket: Socket })._socket, frames: [] }
    set.add(held)
    ws.on('error', () => {})
    ws.on('close', () => {
      set.delete(held)
      if (set.size === 0) sockets.delete(jobId)
    })
    ws.send('{"ready":true}')
  })
  const pending: Held[] = []
  const flush = (): void => {
    for (const held of pending.splice(0)) {
      const { socket, frames } = held
      held.frames = []
      if (socket.destroyed) continue
      if (frames.length === 1) {
        socket.write(frames[0])
      } else {
        socket.cork()
        for (const frame of frames) socket.write(frame)
        socket.uncork()
      }
    }
  }
  const url = new URL(cfg.redisUrl)
  const events = new QueueEvents(cfg.queue, { connection: { host: url.hostname, port: Number(url.port) } })
  events.on('error', () => {})
  events.on('progress', ({ jobId, data }) => {
    const set = sockets.get(jobId)
    if (set === undefined) return
    const { processed, total } = data as { processed: number, total: number }
    const frame = frameText(Buffer.from(JSON.stringify({ job_id: jobId, status: 'processing', progress: total > 0 ? Math.round(processed / total * 1000) / 10 : 0, processed, total, eta_seconds: null })))
    for (const held of set) {
      if (held.frames.length === 0) {
        if (pending.length === 0) process.nextTick(flush)
        pending.push(held)
      }
      held.frames.push(frame)
    }
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
  process.stderr.write(`limit server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
