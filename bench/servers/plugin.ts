import Fastify from 'fastify'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * One API instance with the plugin: one kind on the session's queue, no throttle, and an owner
 * taken from a header so that clients need no cookie. Everything else is the plugin's default.
 */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { redisUrl: string, queue: string, uploadDir: string, fileSize: number }
  // BENCH_LIB points at another copy of lib/index.ts, to measure a candidate change against the peers.
  const { jobProgress } = await import(process.env.BENCH_LIB ?? '../../lib/index') as typeof import('../../lib/index')
  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection: cfg.redisUrl,
    kinds: { bench: { queueName: cfg.queue } },
    getOwner: (request) => request.headers['x-owner'] as string | undefined,
    throttleMs: 0,
    // The bench opens thousands of sockets for one owner; the per-owner limit is not under test.
    maxConnectionsPerOwner: 1_000_000,
    uploadDir: cfg.uploadDir,
    limits: { fileSize: cfg.fileSize },
    // BENCH_PLUGIN_OPTIONS: JSON merged into the options, to measure the effect of one of them.
    ...JSON.parse(process.env.BENCH_PLUGIN_OPTIONS ?? '{}')
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  serve({
    ...commonHandlers(async () => { await app.close() }),
    // A diagnostic copy of lib/ may count, in these globals, progress dropped as stale by the
    // hub and messages conflated by outboxes; the plugin itself does not.
    stats: () => ({ ...app.jobProgress.stats(), stale: (globalThis as any).__jpStale ?? null, conflated: (globalThis as any).__jpConflated ?? null })
  }, { port })
}

main().catch((err) => {
  process.stderr.write(`plugin server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
