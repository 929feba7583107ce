import { createAdapter } from '@socket.io/redis-adapter'
import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { Server } from 'socket.io'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The Socket.IO peer: a server with the Redis adapter; a client joins its job's room on
 * connect; the driver emits progress to that room with the Redis emitter.
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string }
  const pub = new Redis(cfg.redisUrl)
  const sub = pub.duplicate()
  pub.on('error', () => {})
  sub.on('error', () => {})
  const server = createServer()
  const io = new Server(server, { transports: ['websocket'], adapter: createAdapter(pub, sub) })
  io.on('connection', (socket) => {
    const jobId = socket.handshake.query.jobId
    if (typeof jobId === 'string') void socket.join(`job:${jobId}`)
    socket.emit('ready')
  })
  await new Promise<void>(resolve => server.listen(0, '127.0.0.1', resolve))
  const { port } = server.address() as { port: number }
  serve(commonHandlers(async () => {
    io.disconnectSockets(true)
    await new Promise(resolve => io.close(resolve))
    pub.disconnect()
    sub.disconnect()
  }), { port })
}

main().catch((err) => {
  process.stderr.write(`socket.io server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
