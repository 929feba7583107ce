/** Messages are text; a Buffer is sent as text too (rendered once, shared by connections). */
export type OutboxData = string | Buffer

/**
 * What a transport tells its session. The session itself is passed (its methods, not closures
 * made for it): thousands of idle connections would each keep their own pair.
 */
export interface TransportEvents {
  /** A client message (WebSocket only); `size` in bytes. */
  received: (data: Buffer | string, isBinary: boolean, size: number) => void
  /** The connection is gone, whoever ended it. */
  closed: () => void
}

/**
 * One client connection as the session sees it, whatever carries it (WebSocket, SSE). The
 * session owns everything above the wire: authentication, ownership, subscriptions, snapshots,
 * conflation, limits; a transport only moves text and reports what happens to the connection.
 */
export interface Transport {
  readonly kind: 'websocket' | 'sse'
  /** Whether data can still be written. */
  readonly open: boolean
  /** Bytes handed to the transport and not yet flushed to the kernel. */
  readonly bufferedAmount: number
  /** Starts delivering events to the session; called once, synchronously after construction. */
  bind: (events: TransportEvents) => void
  /** Writes one message; `done` runs once it is flushed (or failed). */
  write: (data: OutboxData, done: (err?: Error | null) => void) => void
  /** Ends the connection with a code and a reason (a close frame; SSE: a `close` event or a status). */
  close: (code: number, reason: string) => void
  /** Drops the connection at once, without telling the peer. */
  terminate: () => void
  /**
   * Called every ping interval: a WebSocket pings, and drops a peer that did not answer the last
   * ping; SSE writes a comment so proxies keep the stream open.
   */
  keepalive: () => void
}
