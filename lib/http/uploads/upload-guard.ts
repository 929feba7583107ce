import type { IncomingMessage } from 'node:http'

/** The bounds of an upload's body that the upload route reads (`uploads` option). */
export interface UploadGuardOptions {
  /** Below this rate, averaged over `minRateWindowMs`, the upload is ended; 0: no check. */
  minBytesPerSecond: number
  minRateWindowMs: number
  /** Of a refused upload, at most this much of the rest of the body is read and dropped. */
  refusedDrainBytes: number
  /** ... for at most this long. */
  refusedDrainMs: number
}

/**
 * Calls `onSlow` when the body brings less than `minBytesPerSecond` × `minRateWindowMs` bytes
 * in a window: a client that trickles a byte now and then defeats an idle timeout, and would
 * otherwise hold a request and a partial file open until the total timeout. Returns the stop.
 * Attach it in the same tick as the body's reader, or the listener would start the flow early.
 */
export function watchRate (raw: IncomingMessage, o: UploadGuardOptions, onSlow: () => void): () => void {
  if (o.minBytesPerSecond === 0) return () => {}
  const need = o.minBytesPerSecond * o.minRateWindowMs / 1000
  let bytes = 0
  const count = (chunk: Buffer): void => { bytes += chunk.length }
  raw.on('data', count)
  const timer = setInterval(() => {
    if (bytes < need) onSlow()
    bytes = 0
  }, o.minRateWindowMs).unref()
  return () => {
    clearInterval(timer)
    raw.off('data', count)
  }
}

/**
 * Reads and drops the rest of a refused upload's body, within the stated bounds, before the
 * answer goes out. A socket closed with unread data makes the kernel send a reset, and a client
 * still sending (a browser posting a form, `fetch` with a large body) then sees a network error
 * instead of the answer that says what was wrong. Resolves true once the whole body was read:
 * the answer can then be sent and the connection closed cleanly; false when a bound was hit
 * (the connection is then closed without reading more).
 */
export async function drainBody (raw: IncomingMessage, o: Pick<UploadGuardOptions, 'refusedDrainBytes' | 'refusedDrainMs'>): Promise<boolean> {
  if (raw.complete || raw.readableEnded) return true
  if (raw.destroyed) return false
  // Whatever parser was reading the body lets go of it.
  raw.unpipe()
  return await new Promise<boolean>(resolve => {
    let bytes = 0
    const finish = (whole: boolean): void => {
      clearTimeout(timer)
      raw.off('data', onData)
      raw.off('end', onEnd)
      raw.off('close', onClose)
      if (!whole) raw.pause()
      resolve(whole)
    }
    const onData = (chunk: Buffer): void => {
      bytes += chunk.length
      if (bytes > o.refusedDrainBytes) finish(false)
    }
    const onEnd = (): void => { finish(true) }
    const onClose = (): void => { finish(raw.complete) }
    const timer = setTimeout(() => { finish(false) }, o.refusedDrainMs)
    raw.on('data', onData)
    raw.once('end', onEnd)
    raw.once('close', onClose)
    raw.resume()
  })
}
