import { createServer } from 'node:http'
import { WebSocketServer, type WebSocket } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The floor of the open-sockets phase (bench/sockets.ts): a bare `ws` server that accepts
 * sockets, answers each message with one small message, and does nothing else (no pings, no
 * heartbeats, no Redis).
 *
 * With `--liveness <ms>`, the floor of any server with end-to-end liveness: every socket gets a
 * ping and a small heartbeat message once per period, as one write (the heartbeat's frame and an
 * empty ping frame, built once per second and shared), spread over the period in 100 buckets; a
 * socket that did not answer the last ping is terminated. What the plugin does per idle socket
 * (lib/session/timers.ts), and nothing more.
 */
const BUCKETS = 100
const kAlive = Symbol('alive')
const kBucket = Symbol('bucket')
type Live = WebSocket & { [kAlive]?: boolean, [kBucket]?: Set<Live>, _socket?: { write: (b: Buffer) => boolean } }

/** An unmasked text frame (payload under 126 bytes) followed by an empty ping frame. */
function heartbeatAndPing (now: number): Buffer {
  const payload = Buffer.from(`{"type":"heartbeat","ts":${Math.floor(now / 1000)}}`)
  return Buffer.concat([Buffer.from([0x81, payload.length]), payload, Buffer.from([0x89, 0x00])])
}

// Shared by every socket (`this` is the socket): no closure per socket.
function onPong (this: Live): void { this[kAlive] = true }
function onClose (this: Live): void { this[kBucket]?.delete(this) }

async function main (): Promise<void> {
  const i = process.argv.indexOf('--liveness')
  const periodMs = i > 0 ? Number(process.argv[i + 1]) : 0
  const server = createServer()
  const wss = new WebSocketServer({ server })
  const reply = Buffer.from('{"type":"connected"}')
  const buckets = Array.from({ length: BUCKETS }, () => new Set<Live>())
  let nextBucket = 0
  wss.on('connection', (ws: Live) => {
    ws.send(reply)
    ws.on('message', () => ws.send(reply))
    if (periodMs > 0) {
      ws[kAlive] = true
      ws.on('pong', onPong)
      const bucket = buckets[nextBucket++ % BUCKETS]
      bucket.add(ws)
      ws[kBucket] = bucket
      ws.on('close', onClose)
    }
  })
  let timer: NodeJS.Timeout | null = null
  if (periodMs > 0) {
    let tick = 0
    let frame: { at: number, bytes: Buffer } = { at: -1, bytes: Buffer.alloc(0) }
    timer = setInterval(() => {
      const now = Date.now()
      const second = Math.floor(now / 1000)
      if (frame.at !== second) frame = { at: second, bytes: heartbeatAndPing(now) }
      for (const ws of buckets[tick++ % BUCKETS]) {
        if (ws[kAlive] !== true) {
          ws.terminate()
          continue
        }
        ws[kAlive] = false
        ws._socket?.write(frame.bytes)
      }
    }, periodMs / BUCKETS)
  }
  await new Promise<void>(resolve => server.listen({ port: 0, host: '0.0.0.0', backlog: 8192 }, resolve))
  const { port } = server.address() as { port: number }
  serve({
    ...commonHandlers(async () => {
      if (timer !== null) clearInterval(timer)
      for (const ws of wss.clients) ws.terminate()
      await new Promise(resolve => server.close(resolve))
    }),
    sockets: () => wss.clients.size
  }, { port })
}

main().catch((err) => {
  process.stderr.write(`bare ws server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
