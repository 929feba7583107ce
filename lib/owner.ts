import { Signer } from '@fastify/cookie'
import type { FastifyBaseLogger, FastifyReply, FastifyRequest } from 'fastify'
import { randomBytes, randomUUID } from 'node:crypto'
import { UnauthorizedError } from './errors'
import type { ResolvedOptions } from './options'

/** Who is asking, and how we know. */
export interface Identity {
  owner: string
  via: 'session' | 'apiKey' | 'custom'
}

type KeyResolver = (key: string) => string | null | undefined | Promise<string | null | undefined>

/**
 * Resolves the owner of a request: the `getOwner` hook when given; else an API key (when keys
 * are configured) from `Authorization: Bearer`, the `api_key` query parameter or, for sockets,
 * `Sec-WebSocket-Protocol`; else the signed session cookie.
 */
export class Owners {
  readonly #opts: ResolvedOptions
  readonly #signer: InstanceType<typeof Signer>
  readonly #keys: KeyResolver | null
  readonly #allowedOrigins: Set<string> | null

  constructor (opts: ResolvedOptions, log: FastifyBaseLogger) {
    this.#opts = opts
    let secret = opts.session.secret
    if (secret === undefined && opts.getOwner === undefined) {
      secret = randomBytes(32).toString('hex')
      log.warn('job-progress: no session.secret given; using a random one. Sessions will not survive a restart and will not work across instances.')
    }
    this.#signer = new Signer(secret ?? randomBytes(32).toString('hex'))
    const keys = opts.apiKeys
    this.#keys = keys === undefined ? null : typeof keys === 'function' ? keys : (key: string) => Object.hasOwn(keys, key) ? keys[key] : null
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
  async fromRequest (request: FastifyRequest, websocket = false): Promise<Identity | null> {
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
    return session
  }

  #session (request: FastifyRequest): Identity | null {
    const raw = (request as FastifyRequest & { cookies?: Record<string, string | undefined> }).cookies?.[this.#opts.session.cookieName]
    if (raw === undefined) return null
    const { valid, value } = this.#signer.unsign(raw)
    return valid && value !== null ? { owner: `session:${value}`, via: 'session' } : null
  }

  /** Whether sessions are the fallback, so an upload without credentials may start one. */
  get issuesSessions (): boolean {
    return this.#opts.getOwner === undefined
  }

  /** Starts a session: a signed, HttpOnly, SameSite=Lax cookie. */
  startSession (request: FastifyRequest, reply: FastifyReply): Identity {
    const sid = randomUUID()
    const { cookieName, secure, maxAgeSeconds } = this.#opts.session
    ;(reply as FastifyReply & { setCookie: (name: string, value: string, opts: object) => FastifyReply }).setCookie(cookieName, this.#signer.sign(sid), {
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

/** The API key a request presents and where it came from, or null. */
export function apiKeyOf (request: FastifyRequest, websocket: boolean): { key: string, from: 'header' | 'query' | 'subprotocol' } | null {
  const auth = request.headers.authorization
  if (typeof auth === 'string' && auth.startsWith('Bearer ')) return { key: auth.slice(7).trim(), from: 'header' }
  const query = request.query as Record<string, unknown> | undefined
  if (typeof query?.api_key === 'string') return { key: query.api_key, from: 'query' }
  if (websocket) {
    const protocol = request.headers['sec-websocket-protocol']
    if (typeof protocol === 'string' && protocol !== '') return { key: protocol.split(',')[0].trim(), from: 'subprotocol' }
  }
  return null
}
