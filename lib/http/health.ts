import type { FastifyInstance } from 'fastify'
import { redactedRequest } from '../core/redact'

/**
 * Liveness and readiness routes, for orchestrators and load balancers.
 *
 * - liveness (`/health`): 200 while the process serves HTTP. It does not depend on Redis: a
 *   Redis outage is not cured by restarting every instance, and the plugin recovers on its own.
 * - readiness (`/ready`): 200 only when the instance can do its work: its Redis connections are
 *   up, its bridge (when enabled) is reading the event streams, and it is not shutting down.
 *   Otherwise 503 with what is missing, so traffic goes to the other instances meanwhile.
 */
export function registerHealth (fastify: FastifyInstance, opts: { health: false | { livePath: string, readyPath: string } }, bridgeReady: () => boolean | null): void {
  if (opts.health === false) return
  let closing = false
  fastify.addHook('preClose', async () => { closing = true })
  const jp = (): FastifyInstance['jobProgress'] => fastify.jobProgress

  const state = { type: 'object', additionalProperties: true, properties: { status: { type: 'string' }, instance: { type: 'string' }, redis: { type: 'string', enum: ['up', 'down'] } } }
  const ready = { type: 'object', properties: { status: { type: 'string', enum: ['ready', 'not ready'] }, reason: { type: 'string' }, instance: { type: 'string' }, redis: { type: 'string' }, bridge: { type: 'string' } }, required: ['status'] }
  // Probes are logged like the plugin's other routes: without credentials in the URL.
  const logSerializers = { req: redactedRequest }
  fastify.get(opts.health.livePath, { logSerializers, schema: { summary: 'Liveness', response: { 200: state } } }, async () => {
    return { status: 'ok', instance: jp().instanceId, redis: jp().redisReady() ? 'up' : 'down', ...jp().stats() }
  })
  fastify.get(opts.health.readyPath, { logSerializers, schema: { summary: 'Readiness', response: { 200: ready, 503: ready } } }, async (_request, reply) => {
    const redis = jp().redisReady()
    const bridge = bridgeReady()
    const problems: string[] = []
    if (!redis) problems.push('Redis is not reachable')
    if (bridge === false) problems.push('the bridge is not reading the event streams')
    if (closing) problems.push('the instance is shutting down')
    return await reply.code(problems.length === 0 ? 200 : 503).send({
      status: problems.length === 0 ? 'ready' : 'not ready',
      ...(problems.length > 0 ? { reason: problems.join('; ') } : {}),
      instance: jp().instanceId,
      redis: redis ? 'up' : 'down',
      bridge: bridge === null ? 'disabled' : bridge ? 'running' : 'down'
    })
  })
}
