import Fastify from 'fastify'
import { jobProgress, type JobProgressOptions } from '../../lib/index'
import { TEST_OPTIONS } from './index'
import type { RedisServer } from './redis'

interface Teardown { teardown: (fn: () => unknown) => void }

/** An app like startApp's on a given port (a restart at the same address). */
export async function buildTestApp (t: Teardown, redis: RedisServer, port: number, uploadDir: string, opts: Partial<JobProgressOptions> = {}) {
  const app = Fastify({ logger: false })
  await app.register(jobProgress, {
    connection: redis.url,
    ...TEST_OPTIONS,
    ...opts,
    uploadDir
  })
  await app.listen({ port, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  return app
}
