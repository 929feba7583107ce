import type { FastifyInstance } from 'fastify'
import { RouteTakenError } from '../errors'

/** A route the plugin adds, and the option that places it (what to change when the app has it). */
export interface RoutePlace {
  method: 'GET' | 'POST' | 'DELETE'
  /** The route's path as the plugin registers it, without the app's prefix. */
  path: string
  /** The option that moves it, and how to leave it out when it can be: "set `ssePath` to …". */
  advice: string
  /** False for a route with parameters under `path`: only named when Fastify refuses it. @default true */
  ahead?: boolean
}

/**
 * Refuses to start when the app already serves one of the plugin's routes, naming the option
 * that moves it. Checked before any connection is opened: Fastify's own duplicate-route error
 * would come halfway through registration, name no option and leave clients open.
 */
export function claimRoutes (fastify: FastifyInstance, places: RoutePlace[]): void {
  for (const place of places) {
    if (place.ahead === false) continue
    const url = fastify.prefix + place.path
    if (fastify.hasRoute({ method: place.method, url })) throw new RouteTakenError(place.method, url, place.advice)
  }
}

/**
 * Fastify's duplicate-route error, for a route {@link claimRoutes} could not check ahead (a path
 * with parameters), turned into ours naming the option; any other error is returned as it is.
 */
export function namedRouteError (err: unknown, prefix: string, places: RoutePlace[]): unknown {
  if ((err as { code?: unknown } | null)?.code !== 'FST_ERR_DUPLICATED_ROUTE') return err
  const [, method, url] = /Method '([^']*)' already declared for route '([^']*)'/.exec((err as Error).message) ?? []
  if (url === undefined) return err
  const path = url.slice(prefix.length)
  // The place whose path is the longest start of the route's: `/batch/:jobId/status` is under `/batch`.
  const place = places
    .filter(p => path === p.path || path.startsWith(p.path.endsWith('/') ? p.path : `${p.path}/`))
    .sort((a, b) => b.path.length - a.path.length)[0]
  if (place === undefined) return err
  const named = new RouteTakenError(method, url, place.advice)
  named.cause = err
  return named
}
