import type { FastifyRequest } from 'fastify'

/** Query parameters that carry credentials: their values never reach a log line. */
const SECRET_PARAMS = new Set(['api_key', 'token', 'access_token'])

/** A URL with the values of credential query parameters replaced by `[redacted]`. */
export function redactUrl (url: string): string {
  const q = url.indexOf('?')
  if (q < 0) return url
  const query = url.slice(q + 1).split('&').map(pair => {
    const eq = pair.indexOf('=')
    const name = eq < 0 ? pair : pair.slice(0, eq)
    let decoded = name
    try { decoded = decodeURIComponent(name.replace(/\+/g, ' ')) } catch {}
    return SECRET_PARAMS.has(decoded.toLowerCase()) ? `${name}=[redacted]` : pair
  })
  return `${url.slice(0, q)}?${query.join('&')}`
}

/**
 * A webhook endpoint as logs may show it: scheme, host and path. Its query (a receiver's token
 * often rides there, under any name) and any user or password are replaced by `[redacted]`.
 */
export function redactEndpoint (url: string): string {
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    return '[redacted]'
  }
  const credentials = parsed.username !== '' || parsed.password !== '' ? '[redacted]@' : ''
  return `${parsed.protocol}//${credentials}${parsed.host}${parsed.pathname}${parsed.search === '' ? '' : '?[redacted]'}`
}

/**
 * The request serializer of the plugin's routes: Fastify's default fields, with credentials
 * taken out of the URL. Headers (`Authorization`, `Sec-WebSocket-Protocol`, cookies) are not
 * logged at all.
 */
export function redactedRequest (request: FastifyRequest): Record<string, unknown> {
  return {
    method: request.method,
    url: redactUrl(request.url),
    version: request.headers?.['accept-version'],
    host: request.host,
    remoteAddress: request.ip,
    remotePort: request.socket?.remotePort
  }
}
