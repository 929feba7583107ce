import { Emitter } from '@socket.io/redis-emitter'
import { QueueEvents } from 'bullmq'
import { Redis } from 'ioredis'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The relay of the Socket.IO peer as an application deploys it: one process with a BullMQ
 * QueueEvents that turns each `progress` event of the queue into an emit to the job's room with
 * the Redis emitter, for the Socket.IO servers (bench/servers/sio.ts) to deliver. The progress
 * goes worker → event stream → this relay → Redis pub/sub → servers, two hops, where the `sio`
 * system's driver emits in the same tick as `updateProgress` (one hop, and no relay to pay for).
 * The message is the one the driver emits for `sio`.
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queue: string }
  const pub = new Redis(cfg.redisUrl)
  pub.on('error', () => {})
  const emitter = new Emitter(pub)
  const url = new URL(cfg.redisUrl)
  const events = new QueueEvents(cfg.queue, { connection: { host: url.hostname, port: Number(url.port) } })
  events.on('error', () => {})
  events.on('progress', ({ jobId, data }) => {
    const { processed, total } = data as { processed: number, total: number }
    emitter.to(`job:${jobId}`).emit('progress', { job_id: jobId, status: 'processing', progress: total > 0 ? Math.round(processed / total * 1000) / 10 : 0, processed, total, eta_seconds: null })
  })
  // Ready only once the stream is read: QueueEvents starts at the stream's end, and an event
  // written before that would never reach the sockets.
  await events.waitUntilReady()
  serve(commonHandlers(async () => {
    await events.close()
    pub.disconnect()
  }), { port: 0 })
}

main().catch((err) => {
  process.stderr.write(`socket.io relay: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
