import type { Worker } from 'bullmq'
import type { Redis } from 'ioredis'
import { InvalidOptionError } from '../errors'

// Closing within a stated bound whatever Redis does (guarantee 7): a BullMQ worker (the worker
// helper's and the webhooks' delivery worker), an ioredis client, any step that waits on Redis.
// A paused or unreachable Redis answers nothing, and ioredis has no deadline of its own.

/** How long a worker's `close()` waits for BullMQ before it forces the connections down. */
export const CLOSE_TIMEOUT_MS = 5_000
/** After the force, how long BullMQ gets to finish its close before `close()` resolves anyway. */
export const AFTER_FORCE_MS = 1_000
/** At `app.close()`, how long a step waits for Redis to answer (a QUIT, giving back slots ...). */
export const REDIS_WAIT_MS = 2_000

export interface BoundedCloseOptions {
  /** How long `close()` waits before it forces the connections down. */
  timeoutMs: number
  /** The caller's connection: never forced down (it is theirs to close). */
  keep?: unknown
  /** Connections of ours that the worker uses besides BullMQ's own: forced down too. */
  own?: Redis[]
}

/** `closeTimeoutMs` checked (before any connection is opened), or its default. */
export function closeTimeout (ms: number | undefined): number {
  if (ms === undefined) return CLOSE_TIMEOUT_MS
  // (A timer over 2^31 - 1 ms would fire at once.)
  if (!Number.isInteger(ms) || ms < 0 || ms > 2 ** 31 - 1) {
    throw new InvalidOptionError(`closeTimeoutMs must be a whole number of milliseconds from 0 to ${2 ** 31 - 1} (got ${String(ms)})`)
  }
  return ms
}

interface Connection { client: Promise<unknown> }

/**
 * Makes `worker.close()` resolve within `timeoutMs` + 1 s, whatever Redis does. BullMQ's close
 * waits for its blocking connection's `end` event and for a QUIT to be answered; a client that
 * lost Redis and waits to reconnect sends neither, so the close would wait for Redis to come back.
 * Past `timeoutMs`, the worker's connections (not the caller's) are ended here instead, which
 * lets BullMQ's close finish. A job still running then is not waited for: its lock expires and
 * another worker takes it, as after a crash.
 */
export function boundClose (worker: Worker<any, any>, opts: BoundedCloseOptions): void {
  const close = worker.close.bind(worker)
  let closing: Promise<void> | null = null
  worker.close = async (force?: boolean): Promise<void> => {
    closing ??= (async () => {
      const bullmq = close(force)
      bullmq.catch(() => {})
      if (await settlesWithin(bullmq, opts.timeoutMs)) return await bullmq
      await forceDown(worker, opts)
      if (await settlesWithin(bullmq, AFTER_FORCE_MS)) return await bullmq
    })()
    return await closing
  }
}

/** Ends the worker's own connections at once (the caller's `keep` excepted). */
async function forceDown (worker: Worker<any, any>, opts: BoundedCloseOptions): Promise<void> {
  const backend = worker.getBackend() as unknown as { connection?: Connection, blockingConnection?: Connection }
  const clients = new Set<Redis>(opts.own)
  for (const connection of [backend.connection, backend.blockingConnection]) {
    // A connection that never got to Redis has no client yet: BullMQ's close ends it itself.
    const client = connection === undefined ? undefined : await valueWithin(connection.client, 100) as Redis | undefined
    if (client !== undefined && client !== opts.keep) clients.add(client)
  }
  for (const client of clients) endNow(client)
}

/**
 * Ends an ioredis client now. ioredis ends a client (status `end`, the event BullMQ waits for,
 * queued commands failed) only when its socket closes: a client waiting to reconnect has no
 * socket left to close, and one whose server is paused waits for a close that does not come.
 */
export function endNow (client: Redis): void {
  if (client.status === 'end') return
  const stream = client.stream as Redis['stream'] | undefined
  const live = stream !== undefined && !stream.destroyed
  client.disconnect()
  // (A client that had not connected yet ends at once.)
  if ((client.status as string) === 'end') return
  if (live) {
    // The socket's close event ends the client the ordinary way (it was closed on purpose).
    stream.destroy()
    return
  }
  const internal = client as unknown as { setStatus: (status: string) => void, flushQueue: (err: Error) => void }
  internal.setStatus('end')
  internal.flushQueue(new Error('Connection is closed.'))
}

/** QUIT, answered within `ms`, else the client is ended at once (Redis away or paused). */
export async function quitWithin (client: Redis, ms: number): Promise<void> {
  if (client.status === 'end') return
  if (await settlesWithin(client.quit(), ms)) client.disconnect()
  else endNow(client)
}

/** Whether `promise` settled within `ms` (it goes on in the background otherwise). */
export async function settlesWithin (promise: Promise<unknown>, ms: number): Promise<boolean> {
  return await valueWithin(promise.then(() => true, () => true), ms) === true
}

async function valueWithin<T> (promise: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([promise.catch(() => undefined), new Promise<undefined>(resolve => { timer = setTimeout(() => resolve(undefined), ms) })])
  } finally {
    clearTimeout(timer)
  }
}
