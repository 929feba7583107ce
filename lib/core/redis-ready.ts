import type { Redis } from 'ioredis'

/** Waits for a connection to be ready, at most `ms`; resolves false on timeout. */
export async function whenReady (redis: Redis, ms: number): Promise<boolean> {
  if (redis.status === 'ready') return true
  return await new Promise(resolve => {
    const done = (ok: boolean): void => {
      clearTimeout(timer)
      redis.off('ready', onReady)
      resolve(ok)
    }
    const onReady = (): void => done(true)
    const timer = setTimeout(() => done(false), ms).unref()
    redis.once('ready', onReady)
  })
}
