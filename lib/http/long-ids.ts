import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { WebSocket } from 'ws'
import { JobIdTooLongError } from '../errors'
import { CloseCodes, NOT_FOUND_REASON } from '../wire/close-codes'
import { errors } from './schemas'

/**
 * Fastify's router refuses a path parameter longer than `maxParamLength` (100 by default) with a
 * bare 414 before any route or hook runs. Under each job path the plugin adds a catch-all that
 * the router falls back to in that case, and answers a clear 400 (a socket: close 1008 with the
 * reason) instead; anything else it catches is answered as it would have been without it.
 */
export function registerLongIdRoutes (fastify: FastifyInstance, httpPrefixes: string[], wsPrefixes: string[]): void {
  const max = fastify.initialConfig.maxParamLength ?? 100
  const tooLong = (request: FastifyRequest): boolean => ((request.params as { '*'?: string })['*'] ?? '').split('/')[0].length > max
  const handler = async (request: FastifyRequest, reply: FastifyReply): Promise<void> => {
    if (tooLong(request)) throw new JobIdTooLongError(max)
    reply.callNotFound()
  }
  for (const prefix of new Set(httpPrefixes)) {
    // Not an operation of its own: left out of the OpenAPI document.
    fastify.route({ method: ['GET', 'POST', 'DELETE'], url: `${prefix}/*`, schema: { hide: true, response: errors(400, 404) }, handler })
  }
  for (const prefix of new Set(wsPrefixes)) {
    fastify.get(`${prefix}/*`, { websocket: true }, (socket: WebSocket, request: FastifyRequest) => {
      if (tooLong(request)) socket.close(CloseCodes.policyViolation, `job id too long: at most ${max} characters`)
      else socket.close(CloseCodes.forbidden, NOT_FOUND_REASON)
    })
  }
}
