import { request as httpRequest, type IncomingMessage } from 'node:http'
import { request as httpsRequest } from 'node:https'
import type { LookupAddress } from 'node:dns'

export interface PostOptions {
  url: URL
  /** The addresses the endpoint's name was checked against: the connection goes there and nowhere else. */
  addresses: LookupAddress[]
  headers: Record<string, string>
  body: string
  connectTimeoutMs: number
  timeoutMs: number
  maxResponseBytes: number
}

export interface PostResult {
  status: number
  /** The `Retry-After` header, in ms from now, when the receiver sent one we could read. */
  retryAfterMs: number | null
  /** At most `maxResponseBytes` of the body. */
  body: string
}

/** `Retry-After`: delay-seconds or an HTTP date. */
export function parseRetryAfter (value: string | undefined, now = Date.now()): number | null {
  if (value === undefined) return null
  const text = value.trim()
  if (/^\d+$/.test(text)) return Number(text) * 1000
  const at = Date.parse(text)
  return Number.isNaN(at) ? null : Math.max(0, at - now)
}

/**
 * One POST: no redirect is followed (node's client follows none), the connection is bounded by
 * `connectTimeoutMs` and the whole exchange by `timeoutMs`, and no more than `maxResponseBytes`
 * of the answer is read. Rejects on a network error or a timeout.
 */
export async function post (o: PostOptions): Promise<PostResult> {
  const request = o.url.protocol === 'https:' ? httpsRequest : httpRequest
  return await new Promise<PostResult>((resolve, reject) => {
    let settled = false
    const done = (err: Error | null, result?: PostResult): void => {
      if (settled) return
      settled = true
      clearTimeout(connectTimer)
      clearTimeout(totalTimer)
      if (err !== null) {
        req.destroy()
        reject(err)
      } else {
        resolve(result as PostResult)
      }
    }
    const req = request(o.url, {
      method: 'POST',
      headers: { ...o.headers, 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(o.body)) },
      // A fresh connection per try: an agent's pooled socket may lead to an address checked long ago.
      agent: false,
      // Connect to the checked address; the Host header and TLS name stay the URL's host.
      lookup: ((_host: string, options: { all?: boolean }, cb: (...args: unknown[]) => void) => {
        if (options.all === true) cb(null, o.addresses)
        else cb(null, o.addresses[0].address, o.addresses[0].family)
      }) as never
    })
    const connectTimer = setTimeout(() => done(new Error(`no connection within ${o.connectTimeoutMs} ms`)), o.connectTimeoutMs)
    const totalTimer = setTimeout(() => done(new Error(`no complete response within ${o.timeoutMs} ms`)), o.timeoutMs)
    req.once('socket', (socket) => {
      socket.once(o.url.protocol === 'https:' ? 'secureConnect' : 'connect', () => clearTimeout(connectTimer))
    })
    req.once('error', (err) => done(err))
    req.once('response', (res: IncomingMessage) => {
      const chunks: Buffer[] = []
      let size = 0
      const finish = (): void => {
        const header = res.headers['retry-after']
        done(null, { status: res.statusCode ?? 0, retryAfterMs: parseRetryAfter(Array.isArray(header) ? header[0] : header), body: Buffer.concat(chunks).toString('utf8') })
        res.destroy()
      }
      res.on('data', (chunk: Buffer) => {
        const room = o.maxResponseBytes - size
        if (room > 0) chunks.push(chunk.subarray(0, room))
        size += chunk.length
        // Enough read: the rest of a large or endless body is not our business.
        if (size >= o.maxResponseBytes) finish()
      })
      res.once('end', finish)
      res.once('error', (err) => done(err))
    })
    req.end(o.body)
  })
}
