import type { RawData, WebSocket } from 'ws'
import { CloseCodes, closeReason } from '../wire/close-codes'
import type { OutboxData, Transport, TransportEvents } from '../session/transport'
import { FrameWriter, frameOf, framesFit, senderIdle } from './ws-frame'

const TEXT = { binary: false } as const

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

  constructor (ws: WebSocket) {
    this.ws = ws
    this.#frames = framesFit(ws) ? new FrameWriter(ws) : null
    // ws closes on its own for frames it refuses (over maxPayload: 1009, bad UTF-8: 1007, protocol
    // errors: 1002) and sends no reason. Every close this socket sends gets one: a person reading
    // "1009" alone cannot tell what to change. An app that registered @fastify/websocket itself
    // has its preClose run before ours, and it closes every client without a code: ours still
    // tell their clients 1001.
    const close = ws.close.bind(ws)
    ws.close = (code?: number, reason?: string | Buffer) => {
      // What is held for the end of the tick goes before the close frame.
      this.#frames?.flush()
      if (code === undefined) close(CloseCodes.goingAway, closeReason(CloseCodes.goingAway))
      else close(code, code === 1005 ? undefined : closeReason(code, reason?.toString()))
    }
  }

  get open (): boolean {
    return this.ws.readyState === 1
  }

  get bufferedAmount (): number {
    return this.#frames === null ? this.ws.bufferedAmount : this.ws.bufferedAmount + this.#frames.heldBytes
  }

  bind (events: TransportEvents): void {
    const ws = this.ws
    ws.on('message', (data: RawData, isBinary: boolean) => {
      const size = Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : (data as Buffer).byteLength
      events.message(Array.isArray(data) ? Buffer.concat(data) : data as Buffer, isBinary, size)
    })
    ws.on('pong', () => { this.#alive = true })
    // Errors end in a close event; nothing else to do with them here.
    ws.on('error', () => {})
    ws.on('close', () => events.close())
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
    this.#frames?.flush()
    this.ws.ping()
  }
}
