import { Signer } from '@fastify/cookie'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import { randomBytes, randomUUID } from 'node:crypto'
import { UnauthorizedError } from '../../errors'
import { SESSION_EXPIRED, type Authenticator, type Identity } from '../../core/access'
import { WatchTokens } from './watch-token'

const UUID = '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
const SESSION_VALUE = new RegExp(`^(${UUID})\\.(\\d{1,12})$`)
const UNDATED = new RegExp(`^${UUID}$`)
/** An issue time this far in the future is still accepted (instances' clocks differ a little). */
const CLOCK_SKEW_SECONDS = 300
export const EXPIRED = SESSION_EXPIRED

type KeyResolver = (key: string) => string | null | undefined | Promise<string | null | undefined>

/** The options authentication reads. */
export interface OwnersOptions {
  session: { secret?: string | string[], cookieName: string, secure: boolean | 'auto', maxAgeSeconds: number }
  watchTokens: { secret?: string | string[], ttlSeconds: number }
  getOwner?: (request: FastifyRequest) => string | null | undefined | Promise<string | null | undefined>
  apiKeys?: Record<string, string> | KeyResolver
  allowedOrigins?: string[]
}

/**
 * Resolves the owner of a request: the `getOwner` hook when given; else an API key (when keys
 * are configured) from `Authorization: Bearer`, the `api_key` query parameter or, for sockets,
 * `Sec-WebSocket-Protocol`; else the signed session cookie.
 */
export class Owners implements Authenticator {
  readonly #opts: OwnersOptions
  readonly #signer: InstanceType<typeof Signer>
  readonly #keys: KeyResolver | null
  readonly #allowedOrigins: Set<string> | null
  readonly #expired = new WeakSet<FastifyRequest>()
  /** Null when no secret is configured for them (neither `watchTokens.secret` nor `session.secret`). */
  readonly watchTokens: WatchTokens | null

  constructor (opts: OwnersOptions, log: FastifyBaseLogger) {
    this.#opts = opts
    let secret = opts.session.secret
    if (secret === undefined && opts.getOwner === undefined) {
      secret = randomBytes(32).toString('hex')
      log.warn('job-progress: no session.secret given; using a random one. Sessions will not survive a restart and will not work across instances.')
    }
    this.#signer = new Signer(secret ?? randomBytes(32).toString('hex'))
    const keys = opts.apiKeys
    this.#keys = keys === undefined ? null : typeof keys === 'function' ? keys : (key: string) => Object.hasOwn(keys, key) ? keys[key] : null
    const tokenSecret = opts.watchTokens.secret ?? opts.session.secret
    this.watchTokens = tokenSecret === undefined ? null : new WatchTokens(Array.isArray(tokenSecret) ? tokenSecret : [tokenSecret], opts.watchTokens.ttlSeconds)
    this.#allowedOrigins = opts.allowedOrigins === undefined ? null : new Set(opts.allowedOrigins.map(o => o.toLowerCase()))
  }

  get usesApiKeys (): boolean {
    return this.#keys !== null
  }

  /** The owner behind an API key, or null when the key is unknown. */
  async ownerOfKey (key: string): Promise<string | null> {
    if (this.#keys === null || key === '') return null
    const owner = await this.#keys(key)
    return typeof owner === 'string' && owner !== '' ? owner : null
  }

  /**
   * Null when the request carries no credentials at all; throws {@link UnauthorizedError} when
   * it carries a key that is wrong, so a bad key is never mistaken for "anonymous".
   */
  async fromRequest (request: FastifyRequest, websocket = false, watch = false): Promise<Identity | null> {
    // A watch token names its job and owner itself: it stands in for every other credential (the
    // getOwner hook included) on the routes that only watch a job. A token that does not verify
    // leaves the request's own credentials to decide (a `token` parameter may be the app's own);
    // with none, it allows nothing and is answered like an unknown job.
    if (watch && this.watchTokens !== null) {
      const token = (request.query as Record<string, unknown> | undefined)?.token
      if (token !== undefined) {
        const grant = typeof token === 'string' ? this.watchTokens.verify(token) : null
        if (grant !== null) return { owner: grant.owner, via: 'token', job: { kind: grant.kind, jobId: grant.jobId }, expiresAt: grant.exp * 1000 }
        return await this.#credentials(request, websocket) ?? { owner: `invalid-token:${randomUUID()}`, via: 'token', job: null }
      }
    }
    return await this.#credentials(request, websocket)
  }

  async #credentials (request: FastifyRequest, websocket: boolean): Promise<Identity | null> {
    if (this.#opts.getOwner !== undefined) {
      const owner = await this.#opts.getOwner(request)
      return typeof owner === 'string' && owner !== '' ? { owner, via: 'custom' } : null
    }
    let refused = false
    if (this.#keys !== null) {
      const key = apiKeyOf(request, websocket)
      if (key !== null) {
        const owner = await this.ownerOfKey(key.key)
        if (owner !== null) return { owner, via: 'apiKey' }
        // A browser may offer an application subprotocol of its own: that is not a wrong key
        // when the session cookie vouches for the client.
        if (key.from !== 'subprotocol') throw new UnauthorizedError('invalid API key')
        refused = true
      }
    }
    const session = this.#session(request)
    if (session === null && refused) throw new UnauthorizedError('invalid API key')
    if (session === 'expired') {
      // A socket is refused with the reason; an upload starts a new session; the routes say why.
      if (websocket) throw new UnauthorizedError(EXPIRED)
      this.#expired.add(request)
      return null
    }
    return session
  }

  /** Whether the request's only credential was a session cookie past its max age (or of the old, undated format). */
  expiredSession (request: FastifyRequest): boolean {
    return this.#expired.has(request)
  }

  /**
   * The cookie signs `<session id>.<issued at, Unix seconds>` with the first secret; any listed
   * secret verifies, so secrets can be rotated. A cookie older than `maxAgeSeconds`, or of the
   * undated format (`<session id>` alone, issued before sessions expired), is expired: its age
   * cannot be bounded, so it is refused rather than trusted for ever.
   */
  #session (request: FastifyRequest): Identity | null | 'expired' {
    const raw = (request as FastifyRequest & { cookies?: Record<string, string | undefined> }).cookies?.[this.#opts.session.cookieName]
    if (raw === undefined) return null
    const { valid, value } = this.#signer.unsign(raw)
    if (!valid || value === null) return null
    const match = SESSION_VALUE.exec(value)
    if (match === null) return UNDATED.test(value) ? 'expired' : null
    const issuedAt = Number(match[2])
    const now = Date.now() / 1000
    if (issuedAt > now + CLOCK_SKEW_SECONDS || now - issuedAt > this.#opts.session.maxAgeSeconds) return 'expired'
    return { owner: `session:${match[1]}`, via: 'session', expiresAt: (issuedAt + this.#opts.session.maxAgeSeconds) * 1000 }
  }

  /** Whether sessions are the fallback, so an upload without credentials may start one. */
  get issuesSessions (): boolean {
    return this.#opts.getOwner === undefined
  }

  /** Starts a session: a signed, HttpOnly, SameSite=Lax cookie. */
  startSession (request: FastifyRequest, reply: FastifyReply): Identity {
    const sid = randomUUID()
    const { cookieName, secure, maxAgeSeconds } = this.#opts.session
    ;(reply as FastifyReply & { setCookie: (name: string, value: string, opts: object) => FastifyReply }).setCookie(cookieName, this.#signer.sign(`${sid}.${Math.floor(Date.now() / 1000)}`), {
      path: '/',
      httpOnly: true,
      sameSite: 'lax',
      secure: secure === 'auto' ? request.protocol === 'https' : secure,
      maxAge: maxAgeSeconds
    })
    return { owner: `session:${sid}`, via: 'session' }
  }

  /**
   * Cookie-authenticated sockets must come from an allowed origin, or any site the user visits
   * could open a socket with the user's cookie (cross-site WebSocket hijacking). Clients that are
   * not browsers send no Origin and carry no ambient cookie risk.
   */
  originAllowed (request: FastifyRequest): boolean {
    const origin = request.headers.origin
    if (origin === undefined) return true
    if (this.#allowedOrigins !== null) return this.#allowedOrigins.has(origin.toLowerCase())
    try {
      return new URL(origin).host.toLowerCase() === String(request.headers.host ?? '').toLowerCase()
    } catch {
      return false
    }
  }
}

/** RFC 6750 `b64token` (token68): the only characters a Bearer token may have. */
const TOKEN68 = /^[A-Za-z0-9\-._~+/]+=*$/

/**
 * The API key a request presents and where it came from, or null when it presents none. One
 * documented way: `Authorization: Bearer <token>` as RFC 6750 writes it (scheme in any case,
 * exactly one space, token68 characters), or one `api_key` query parameter, or for sockets the
 * first `Sec-WebSocket-Protocol` value (browsers cannot set headers). Throws
 * {@link UnauthorizedError} for a malformed Bearer header, `api_key` given twice, or a header
 * and a query key together (RFC 6750: one method per request). Other Authorization schemes are
 * not ours and are ignored.
 */
export function apiKeyOf (request: FastifyRequest, websocket: boolean): { key: string, from: 'header' | 'query' | 'subprotocol' } | null {
  let found: { key: string, from: 'header' | 'query' } | null = null
  const auth = request.headers.authorization
  if (typeof auth === 'string' && /^bearer(?:[ \t]|$)/i.test(auth)) {
    const token = auth.slice(7)
    if (auth[6] !== ' ' || !TOKEN68.test(token)) throw new UnauthorizedError('malformed Authorization header: expected "Bearer <token>" with one space and no other whitespace (RFC 6750)')
    found = { key: token, from: 'header' }
  }
  const query = request.query as Record<string, unknown> | undefined
  const param = query?.api_key
  if (Array.isArray(param)) throw new UnauthorizedError('api_key given more than once: send it once')
  if (typeof param === 'string') {
    if (found !== null) throw new UnauthorizedError('an API key in both the Authorization header and api_key: send it one way')
    found = { key: param, from: 'query' }
  }
  if (found !== null) return found
  if (websocket) {
    const protocol = request.headers['sec-websocket-protocol']
    if (typeof protocol === 'string' && protocol !== '') return { key: protocol.split(',')[0].trim(), from: 'subprotocol' }
  }
  return null
}
