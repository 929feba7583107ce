import { createHmac, timingSafeEqual } from 'node:crypto'

/** What a watch token allows: watching one job of one kind, owned by `owner`, until `exp`. */
export interface WatchGrant {
  kind: string
  jobId: string
  owner: string
  /** Expiry, Unix seconds. */
  exp: number
}

/** Everything but the job id, kind and owner is fixed, so a token cannot be bent to another use. */
const PURPOSE = 'jp-watch-v1'
/** Tokens are short: a URL carries them (`?token=`), and proxies limit URL length. */
const MAX_TOKEN_LENGTH = 2048

const b64 = (data: Buffer | string): string => Buffer.from(data).toString('base64url')

/**
 * Signed, expiring tokens that let anyone who holds one watch one job, without the owner's
 * session: `<base64url(payload)>.<base64url(HMAC-SHA256)>`. The payload names the kind, the job,
 * the owner and the expiry; the MAC also covers a fixed purpose, so no other signed value of the
 * plugin (a session cookie, a webhook signature) can pass for a token even under the same secret.
 * Verifying needs no Redis read. Secrets rotate: the first signs, every one verifies.
 */
export class WatchTokens {
  readonly #secrets: string[]
  readonly ttlSeconds: number

  constructor (secrets: string[], ttlSeconds: number) {
    if (secrets.length === 0) throw new TypeError('watch tokens need at least one secret')
    this.#secrets = secrets
    this.ttlSeconds = ttlSeconds
  }

  sign (grant: Omit<WatchGrant, 'exp'>, now = Date.now()): { token: string, expiresAt: number } {
    const exp = Math.floor(now / 1000) + this.ttlSeconds
    const payload = b64(JSON.stringify({ k: grant.kind, j: grant.jobId, o: grant.owner, e: exp }))
    return { token: `${payload}.${mac(this.#secrets[0], payload)}`, expiresAt: exp }
  }

  /** The grant of a token signed by one of the secrets and not expired, else null. */
  verify (token: string, now = Date.now()): WatchGrant | null {
    if (token.length > MAX_TOKEN_LENGTH) return null
    const dot = token.indexOf('.')
    if (dot < 1 || dot !== token.lastIndexOf('.')) return null
    const payload = token.slice(0, dot)
    const given = Buffer.from(token.slice(dot + 1), 'base64url')
    const signed = this.#secrets.some(secret => {
      const expected = Buffer.from(mac(secret, payload), 'base64url')
      return expected.length === given.length && timingSafeEqual(expected, given)
    })
    if (!signed) return null
    let body: { k?: unknown, j?: unknown, o?: unknown, e?: unknown }
    try {
      body = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'))
    } catch {
      return null
    }
    if (typeof body?.k !== 'string' || typeof body.j !== 'string' || typeof body.o !== 'string' || typeof body.e !== 'number') return null
    if (body.e * 1000 <= now) return null
    return { kind: body.k, jobId: body.j, owner: body.o, exp: body.e }
  }
}

function mac (secret: string, payload: string): string {
  return createHmac('sha256', secret).update(`${PURPOSE}.${payload}`).digest('base64url')
}
