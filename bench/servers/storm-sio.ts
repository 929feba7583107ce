import { createAdapter } from '@socket.io/redis-adapter'
import { Redis } from 'ioredis'
import { createServer } from 'node:http'
import { Server } from 'socket.io'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The Socket.IO peer of the subscribe storm: the Redis adapter; each `subscribe` reads the job's
 * owner (its data in the BullMQ hash), joins the job's room and acknowledges, which is the
 * subscription's first message.
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queues: string[], backlog?: number }
  const pub = new Redis(cfg.redisUrl)
  const sub = pub.duplicate()
  pub.on('error', () => {})
  sub.on('error', () => {})
  const server = createServer()
  const io = new Server(server, { transports: ['websocket'], adapter: createAdapter(pub, sub) })
  const queue = cfg.queues[0]
  io.on('connection', (socket) => {
    socket.on('subscribe', (jobId: string, ack: (ok: boolean) => void) => {
      pub.hget(`bull:${queue}:${jobId}`, 'data').then(data => {
        if (data === null || (JSON.parse(data) as { owner?: string }).owner !== socket.handshake.query.owner) return ack(false)
        void socket.join(`job:${jobId}`)
        ack(true)
      }, () => ack(false))
    })
    socket.emit('ready')
  })
  await new Promise<void>(resolve => server.listen({ port: 0, host: '0.0.0.0', backlog: cfg.backlog ?? 8192 }, resolve))
  const { port } = server.address() as { port: number }
  serve(commonHandlers(async () => {
    io.disconnectSockets(true)
    await new Promise(resolve => io.close(resolve))
    pub.disconnect()
    sub.disconnect()
  }), { port })
}

main().catch((err) => {
  process.stderr.write(`storm socket.io server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
