import type { FastifyBaseLogger, FastifyRequest } from 'fastify'
import { ServerResponse } from 'node:http'
import type { Socket } from 'node:net'
import type { RawData, WebSocket } from 'ws'
import { CloseCodes, closeReason } from '../wire/close-codes'
import type { OutboxData, Transport, TransportEvents } from '../session/transport'
import { FrameWriter, frameOf, framesFit, senderIdle } from './ws-frame'

const TEXT = { binary: false } as const

/**
 * Where the listeners and the `close` every socket shares find the socket's transport: one
 * property on the socket instead of a closure per listener per socket, which an idle socket
 * would keep for its whole life.
 */
const kTransport = Symbol('job-progress transport')
type Ws = WebSocket & { [kTransport]?: WebSocketTransport }

const ignore = (): void => {}

/** A ping frame without payload (FIN, opcode 0x9, length 0), as a server sends it (unmasked). */
const PING = Buffer.from([0x89, 0x00])

/**
 * A `ws` socket as a session transport. Text frames in, text frames out; WebSocket ping/pong for
 * liveness.
 */
export class WebSocketTransport implements Transport {
  readonly kind = 'websocket'
  readonly ws: WebSocket
  /** Answered the last ping. */
  #alive = true
  /** Writes prebuilt frames; null when they do not fit this socket (an extension negotiated), known after the handshake. */
  readonly #frames: FrameWriter | null
  /** The socket's own `close`, called with the socket as `this`. */
  readonly #close: WebSocket['close']
  /** Whom the socket's events go to, once bound. */
  #events: TransportEvents | null = null
  /** The upgrade request's id, for log lines about this socket once the request is let go. */
  readonly requestId: string | undefined

  constructor (ws: WebSocket, requestId?: string) {
    this.ws = ws
    this.requestId = requestId
    this.#frames = framesFit(ws) ? new FrameWriter(ws) : null
    // ws closes on its own for frames it refuses (over maxPayload: 1009, bad UTF-8: 1007, protocol
    // errors: 1002) and sends no reason. Every close this socket sends gets one: a person reading
    // "1009" alone cannot tell what to change. An app that registered @fastify/websocket itself
    // has its preClose run before ours, and it closes every client without a code: ours still
    // tell their clients 1001.
    const previous = (ws as Ws)[kTransport]
    this.#close = previous === undefined ? ws.close : previous.#close
    ;(ws as Ws)[kTransport] = this
    ws.close = WebSocketTransport.#closeWithReason
  }

  static #closeWithReason (this: Ws, code?: number, reason?: string | Buffer): void {
    const transport = this[kTransport] as WebSocketTransport
    // What is held for the end of the tick goes before the close frame.
    transport.#frames?.flush()
    if (code === undefined) transport.#close.call(this, CloseCodes.goingAway, closeReason(CloseCodes.goingAway))
    else transport.#close.call(this, code, code === 1005 ? undefined : closeReason(code, reason?.toString()))
  }

  // The socket's listeners, the same functions for every socket (`this` is the socket).
  static #onMessage (this: Ws, data: RawData, isBinary: boolean): void {
    const size = Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : (data as Buffer).byteLength
    const transport = this[kTransport]
    if (transport !== undefined) transport.#events?.received(Array.isArray(data) ? Buffer.concat(data) : data as Buffer, isBinary, size)
  }

  static #onPong (this: Ws): void {
    const transport = this[kTransport]
    if (transport !== undefined) transport.#alive = true
  }

  static #onClose (this: Ws): void {
    const transport = this[kTransport]
    if (transport !== undefined) transport.#events?.closed()
  }

  get open (): boolean {
    return this.ws.readyState === 1
  }

  get bufferedAmount (): number {
    return this.#frames === null ? this.ws.bufferedAmount : this.ws.bufferedAmount + this.#frames.heldBytes
  }

  bind (events: TransportEvents): void {
    const ws = this.ws
    this.#events = events
    // One transport per socket: a later one takes the socket's events over instead of adding
    // the shared listeners again (they find the socket's latest transport).
    if (ws.listeners('message').includes(WebSocketTransport.#onMessage)) return
    ws.on('message', WebSocketTransport.#onMessage)
    ws.on('pong', WebSocketTransport.#onPong)
    // Errors end in a close event; nothing else to do with them here. The listener is only there
    // so that an error does not throw: one added by whoever made the socket does as well.
    if (ws.listenerCount('error') === 0) ws.on('error', ignore)
    ws.on('close', WebSocketTransport.#onClose)
    // Closed before the route ran (a reset right after the upgrade): its `close` has been and gone.
    if (ws.readyState === 3) queueMicrotask(() => events.closed())
  }

  write (data: OutboxData, done: (err?: Error | null) => void): void {
    // A Buffer is a rendered event shared by every socket of its job: framed once for all of them.
    const frames = this.#frames
    if (frames !== null && typeof data !== 'string' && this.ws.readyState === 1 && senderIdle(this.ws)) {
      frames.write(frameOf(data), done)
      return
    }
    // ws writes at once: what is held for the end of the tick goes first.
    frames?.flush()
    this.ws.send(data, TEXT, done)
  }

  close (code: number, reason: string): void {
    if (this.ws.readyState === 0 || this.ws.readyState === 1) this.ws.close(code, reason)
  }

  terminate (): void {
    this.ws.terminate()
  }

  keepalive (): void {
    if (!this.#alive) {
      this.ws.terminate()
      return
    }
    this.#alive = false
    // An empty ping is the same two bytes for every socket: written as it is, with whatever else
    // this socket sends in the tick, instead of framed by ws for each socket.
    const frames = this.#frames
    if (frames !== null && this.ws.readyState === 1 && senderIdle(this.ws)) {
      frames.write(PING, ignore)
      return
    }
    frames?.flush()
    this.ws.ping()
  }
}

/**
 * The error listener every socket shares when the plugin registered @fastify/websocket: what its
 * default handler does (log the error with the request's id, terminate the socket), without a
 * closure per socket over the request and reply.
 */
export function socketErrorHandler (log: FastifyBaseLogger): (this: WebSocket, err: Error) => void {
  return function (this: Ws, err: Error): void {
    log.error({ err, reqId: this[kTransport]?.requestId }, err.message)
    this.terminate()
  }
}

/**
 * Lets go of what @fastify/websocket leaves tied to an accepted socket for its whole life: the
 * upgrade's request, reply and raw HTTP messages (headers, the request's bytes), about 3 KB per
 * socket that nothing reads after the route handler.
 *
 * - It routes the upgrade with a ServerResponse assigned to the connection; the reply is hijacked
 *   and nothing is written to that response again, but the connection keeps pointing at it, and
 *   through Fastify's listeners on it at the reply and the request. It is detached here.
 * - It adds an error listener to the socket that closes over the request and the reply to call
 *   its error handler. When the plugin registered @fastify/websocket, that handler is the
 *   default one: `onError`, one function for every socket, does the same instead (logs the
 *   error, terminates the socket). An application's own registration keeps its listener, and
 *   so its sockets keep their request and reply.
 *
 * The upgrade's ServerResponse no longer emits `close` when the socket closes (nothing is sent
 * on it after the upgrade; the socket's own `close` event is the one to listen to).
 */
export function releaseUpgrade (ws: WebSocket, request: FastifyRequest, onError?: (this: WebSocket, err: Error) => void): void {
  const connection = request.raw.socket as (Socket & { _httpMessage?: unknown }) | null
  const res = connection?._httpMessage
  if (connection != null && res instanceof ServerResponse && res.socket === connection) res.detachSocket(connection)
  if (onError !== undefined) {
    // Its listener is the last one added before the route handler runs; those the application
    // added on the server's `connection` event come before it and stay.
    const listeners = ws.listeners('error')
    if (listeners.length > 0) ws.removeListener('error', listeners[listeners.length - 1] as (err: Error) => void)
    ws.on('error', onError)
  }
}
