import type { FastifyInstance, FastifyReply, FastifyRequest, RouteOptions } from 'fastify'
import { Server as HttpServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { Server as HttpsServer } from 'node:https'
import type { Socket } from 'node:net'

/**
 * After the grace, how long answers still being written (an upload's 503) get before their
 * connections are destroyed anyway.
 */
export const ANSWER_MS = 1_000

type OnRequest = (request: FastifyRequest, reply: FastifyReply, done: () => void) => void

/**
 * The connections serving the plugin's routes, so that `app.close()` ends within its grace
 * whatever clients do. The server's close waits for every open connection: an upload still
 * trickling, a socket whose client never answers the close frame (ws waits 30 s for it), an SSE
 * stream whose client stopped reading, a read waiting on a paused Redis. Uploads are answered 503
 * at the grace (see InFlightUploads); `ANSWER_MS` later, whatever is still open here is destroyed.
 * Connections of the app's own routes are not touched.
 *
 * Nor is any connection that is serving no request at all: a client's pool may have opened one
 * and sent nothing yet (a fetch aborted while its connection was being made leaves such a one),
 * a client may be half-way through a request's head, or keep one alive between requests. Node
 * counts the first two as busy, so the server's close does not end them, and it stops the timer
 * that would have ended them (`headersTimeout`): the close waited until the client hung up (70 s
 * for the client of my jobs over SSE, none for a silent TCP client). Once the server closes, such
 * a connection can only ever be answered 503: these too are destroyed with the rest.
 */
export class Connections {
  readonly #open = new Set<Socket>()
  /** Every connection of the server, with its requests still being answered (an upgraded one counts as busy for ever). */
  readonly #all = new Map<Socket, number>()
  #timer: NodeJS.Timeout | null = null
  /**
   * The one `close` listener of every connection followed here (`this` is the socket), instead of
   * a closure and a once-wrapper per socket and per map: an open WebSocket would keep them for its
   * whole life (about 600 bytes a socket).
   */
  readonly #forget: (this: Socket) => void

  constructor () {
    const all = this.#all
    const open = this.#open
    this.#forget = function (this: Socket): void {
      all.delete(this)
      open.delete(this)
    }
  }

  /**
   * Follows every connection of `server`, to tell at the grace which serve no request. Only for
   * HTTP/1 servers: on HTTPS a connection is its TLS socket (a handshake never finished is ended
   * by Node's own `handshakeTimeout`).
   */
  watch (server: unknown): void {
    const event = server instanceof HttpServer ? 'connection' : server instanceof HttpsServer ? 'secureConnection' : null
    if (event === null) return
    const http = server as HttpServer
    http.on(event, (socket: Socket) => {
      this.#all.set(socket, 0)
      socket.on('close', this.#forget)
    })
    http.on('request', (request: IncomingMessage, response: ServerResponse) => {
      const socket = request.socket
      const busy = this.#all.get(socket)
      if (busy === undefined) return
      this.#all.set(socket, busy + 1)
      response.once('close', () => {
        const now = this.#all.get(socket)
        if (now !== undefined) this.#all.set(socket, now - 1)
      })
    })
    // (Node hands an upgrade to its 'upgrade' listeners instead of 'request'; the plugin always has
    // a WebSocket server listening there, so this one changes nothing.)
    http.on('upgrade', (request: IncomingMessage) => { if (this.#all.has(request.socket)) this.#all.set(request.socket, Infinity) })
  }

  /** Tracks the connections of `route` (a route of the plugin's own, from an `onRoute` hook). */
  adopt (route: RouteOptions): void {
    const hooks = route.onRequest === undefined ? [] : Array.isArray(route.onRequest) ? route.onRequest : [route.onRequest]
    route.onRequest = [...hooks, this.#track] as RouteOptions['onRequest']
  }

  get size (): number {
    return this.#open.size
  }

  /** A request to one of the plugin's routes: its connection counts until its answer is done. */
  readonly #track: OnRequest = (request, reply, done) => {
    const socket = request.raw.socket as Socket | null
    if (socket !== null && !socket.destroyed && !this.#open.has(socket)) {
      this.#open.add(socket)
      // A connection the server's own listener does not follow (HTTPS) gets the listener here, once.
      if (!this.#all.has(socket) && !socket.listeners('close').includes(this.#forget)) socket.on('close', this.#forget)
      // A socket upgraded to a WebSocket counts until it closes; a kept-alive HTTP connection
      // only until this answer is done (it may serve the app's own routes next).
      if (request.raw.headers.upgrade === undefined) reply.raw.once('close', () => { this.#open.delete(socket) })
    }
    done()
  }

  /** Starts the grace: connections still open `graceMs` + `ANSWER_MS` later are destroyed. */
  closing (graceMs: number): void {
    this.#timer = setTimeout(() => {
      this.#timer = null
      for (const socket of this.#open) socket.destroy()
      this.#open.clear()
      for (const [socket, busy] of this.#all) if (busy === 0) socket.destroy()
    }, graceMs + ANSWER_MS)
    // Open connections keep the process alive anyway; without them there is nothing to end.
    this.#timer.unref()
  }

  closed (): void {
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = null
  }
}

/** Ties the plugin's connections to the app's close: a line in the plugin, the rest here. */
export function trackConnections (fastify: FastifyInstance, graceMs: number): Connections {
  const connections = new Connections()
  connections.watch(fastify.server)
  fastify.addHook('preClose', async () => { connections.closing(graceMs) })
  fastify.addHook('onClose', async () => { connections.closed() })
  return connections
}
