import Fastify from 'fastify'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * One API instance for the subscribe storm (bench/storm.ts) and the open-sockets phase
 * (bench/sockets.ts): the plugin with the `jobs` protocol at /ws/jobs, `kinds` kinds (the
 * watched jobs are in the first one's queue), the owner taken from a header, and everything
 * else the plugin's default (heartbeats and pings on).
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queues: string[], backlog?: number }
  const { jobProgress, jobsProtocol } = await import(process.env.BENCH_LIB ?? '../../lib/index') as typeof import('../../lib/index')
  const app = Fastify({ logger: false })
  const kinds: Record<string, { queueName: string }> = {}
  cfg.queues.forEach((queue, i) => { kinds[i === 0 ? 'storm' : `other${i}`] = { queueName: queue } })
  await app.register(jobProgress, {
    connection: cfg.redisUrl,
    kinds,
    getOwner: (request) => request.headers['x-owner'] as string | undefined,
    // The bench opens thousands of sockets for one owner; the limit is taken, not reached.
    maxConnectionsPerOwner: 1_000_000,
    protocols: [jobsProtocol({ path: '/ws/jobs' })],
    ...JSON.parse(process.env.BENCH_PLUGIN_OPTIONS ?? '{}')
  })
  // Thousands of connections opened at once: Node's default backlog (511) would drop most and
  // leave the kernel's retry timers (1, 3, 7 s) in the figures.
  await app.listen({ port: 0, host: '0.0.0.0', backlog: cfg.backlog ?? 8192 })
  const { port } = app.server.address() as { port: number }
  serve({
    ...commonHandlers(async () => { await app.close() }),
    stats: () => app.jobProgress.stats()
  }, { port })
}

main().catch((err) => {
  process.stderr.write(`storm plugin server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
