import type { FastifyInstance } from 'fastify'
import { createHash } from 'node:crypto'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { InvalidOptionError } from '../errors'

/** The plugin's root: dist/ when compiled, lib/ when run from source (this file is in <root>/http/). */
const ROOT = join(__dirname, '..')

/** Where the built client is: next to the compiled plugin (dist/), or in dist/ when run from source. */
export function clientFile (): string | null {
  for (const file of [join(ROOT, 'client', 'index.min.mjs'), join(ROOT, '..', 'dist', 'client', 'index.min.mjs')]) {
    if (existsSync(file)) return file
  }
  return null
}

/**
 * Serves fastify-job-progress/client as one ES module at `path`, so a page without a bundler can
 * `import { JobProgressClient } from '<path>'`. Read once at registration; an ETag answers
 * repeat visits with 304, and browsers may keep it for an hour without asking.
 */
export function registerClientRoute (fastify: FastifyInstance, path: string): void {
  const file = clientFile()
  if (file === null) throw new InvalidOptionError('`clientRoute` serves the built client, which is missing: run `npm run build`')
  const body = readFileSync(file)
  const etag = `"${createHash('sha256').update(body).digest('base64url').slice(0, 22)}"`
  const schema = {
    summary: 'The browser client, as one ES module',
    produces: ['text/javascript'],
    response: { 200: { description: 'the module', type: 'string' }, 304: { description: 'unchanged (ETag)', type: 'null' } }
  }
  fastify.get(path, { schema }, async (request, reply) => {
    void reply
      .header('content-type', 'text/javascript; charset=utf-8')
      .header('cache-control', 'public, max-age=3600')
      .header('etag', etag)
    if (request.headers['if-none-match'] === etag) return await reply.code(304).send()
    return await reply.send(body)
  })
}
