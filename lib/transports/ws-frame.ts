import WebSocketModule, { type WebSocket } from 'ws'

/**
 * Writing one prebuilt WebSocket frame to many sockets. `ws` frames every `send` anew (a header
 * buffer, a corked pair of writes) for each socket; a job's event goes to every socket watching
 * it with the same bytes, so it is framed once (server frames are never masked) and each socket
 * gets one write of the same buffer, as the fastest Node WebSocket servers do.
 *
 * `ws` has no public API for this: what it relies on is checked per socket
 * ({@link framesFit}, {@link senderIdle}) and covered by test/ws-frame.test.ts, which fails when `ws` changes it.
 * Anything else (permessage-deflate negotiated, a fragmented or queued send in progress, a
 * `ws` whose internals differ) falls back to `ws.send`.
 */

/** `ws`'s frame builder: exported at run time, absent from its typings. */
const Sender = (WebSocketModule as unknown as { Sender?: { frame?: unknown } }).Sender ?? {}

/** The parts of `ws`'s socket and sender the direct write uses. */
interface WsInternals {
  _socket?: { write?: unknown, destroyed?: boolean } | null
  _sender?: { _state?: unknown, _firstFragment?: unknown, _queue?: unknown } | null
  _extensions?: Record<string, unknown>
}

/** Sender.frame's options for an unmasked, unfragmented, uncompressed text frame. */
const TEXT_FRAME = { fin: true, opcode: 1, mask: false, readOnly: false, rsv1: false }

/** Whether `ws` still has what the direct write relies on (checked once). */
export const framingSupported = typeof Sender.frame === 'function'

/** Frames `payload` as one unmasked text frame, header and payload in one buffer. */
export function frameText (payload: Buffer): Buffer {
  const parts = (Sender as unknown as { frame: (data: Buffer, options: object) => Buffer[] }).frame(payload, TEXT_FRAME)
  return parts.length === 1 ? parts[0] : Buffer.concat(parts, parts[0].length + payload.length)
}

/**
 * Whether prebuilt frames can ever go to this socket: no extension that changes the frames
 * (permessage-deflate), and the sender and net socket `ws` has had since 8.0. Fixed once the
 * handshake is done: checked once per socket.
 */
export function framesFit (ws: WebSocket): boolean {
  const w = ws as unknown as WsInternals
  const sender = w._sender
  const socket = w._socket
  return framingSupported &&
    sender != null && typeof sender._state === 'number' && typeof sender._firstFragment === 'boolean' && Array.isArray(sender._queue) &&
    w._extensions != null && Object.keys(w._extensions).length === 0 &&
    socket != null && typeof socket.write === 'function'
}

/**
 * Whether a prebuilt frame can go straight to a socket that {@link framesFit} now: its sender
 * idle (nothing queued behind a compression or a blob, no fragmented message open).
 */
export function senderIdle (ws: WebSocket): boolean {
  const sender = (ws as unknown as { _sender: { _state: number, _firstFragment: boolean } })._sender
  return sender._state === 0 && sender._firstFragment
}

/** Both checks at once (for tests). */
export const canWriteFrame = (ws: WebSocket): boolean => framesFit(ws) && senderIdle(ws)

/**
 * The frames of the last few payloads: the hub hands the same rendered buffer to every socket of
 * a job one after the other (one per protocol), so a handful of entries covers it with no
 * per-message map or weak reference.
 */
const SLOTS = 4
const payloads: Array<Buffer | null> = new Array(SLOTS).fill(null)
const frames: Array<Buffer | null> = new Array(SLOTS).fill(null)
let next = 0

/** Frames of payloads built since start (for tests and metrics). */
export const frameStats = { built: 0, written: 0 }

/** The frame of `payload`, built once for every socket it goes to. */
export function frameOf (payload: Buffer): Buffer {
  for (let i = 0; i < SLOTS; i++) {
    if (payloads[i] === payload) return frames[i] as Buffer
  }
  const frame = frameText(payload)
  frameStats.built++
  payloads[next] = payload
  frames[next] = frame
  next = (next + 1) % SLOTS
  return frame
}

interface NetSocket {
  write: (b: Buffer, cb: (err?: Error | null) => void) => boolean
  cork: () => void
  uncork: () => void
}

type Done = (err?: Error | null) => void

/** Sockets holding a frame (or corked) in this tick, written once it ends. */
const held: FrameWriter[] = []
const flushHeld = (): void => {
  // Taken first: a write callback may hold a frame again.
  const writers = held.splice(0)
  for (const writer of writers) writer.flush()
}

/**
 * Writes prebuilt frames to one socket, at the end of the tick. The bridge hands a whole read of
 * the stream over in one tick: at high rates that holds several events of a job, and the socket
 * then sends them in one system call instead of one each (as uWS corks per loop turn). The usual
 * case is one frame per socket and tick: that one is held as it is and written alone, with no
 * cork, no buffered write request and no uncork, so a socket costs one plain write per message.
 */
export class FrameWriter {
  readonly #ws: WebSocket
  /** `ws`'s net socket: set once before the connection event, never replaced. */
  readonly #socket: NetSocket
  #frame: Buffer | null = null
  #done: Done | null = null
  #corked = false

  constructor (ws: WebSocket) {
    this.#ws = ws
    this.#socket = (ws as unknown as { _socket: NetSocket })._socket
  }

  /** Bytes held here, not yet handed to the socket. */
  get heldBytes (): number {
    return this.#frame === null ? 0 : this.#frame.length
  }

  /** Writes `frame` once the tick ends; `done` runs once it is flushed (or failed). */
  write (frame: Buffer, done: Done): void {
    frameStats.written++
    if (this.#corked) {
      this.#socket.write(frame, done)
      return
    }
    if (this.#frame === null) {
      if (held.length === 0) process.nextTick(flushHeld)
      this.#frame = frame
      this.#done = done
      held.push(this)
      return
    }
    // A second frame in this tick: the socket is corked and both go out in one write at its end.
    const socket = this.#socket
    socket.cork()
    this.#corked = true
    const first = this.#frame
    const firstDone = this.#done as Done
    this.#frame = null
    this.#done = null
    socket.write(first, firstDone)
    socket.write(frame, done)
  }

  /**
   * Writes what is held now. Runs at the end of the tick, and before anything `ws` itself sends
   * on this socket (a text message, a ping, the close frame), so frames keep their order.
   */
  flush (): void {
    const frame = this.#frame
    if (frame !== null) {
      const done = this.#done as Done
      this.#frame = null
      this.#done = null
      // Closed meanwhile (a close frame may already be out): nothing more goes after it.
      if (this.#ws.readyState !== 1) process.nextTick(done, new Error('WebSocket is not open'))
      else this.#socket.write(frame, done)
    }
    if (this.#corked) {
      this.#corked = false
      this.#socket.uncork()
    }
  }
}
