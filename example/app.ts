import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import { execFileSync } from 'node:child_process'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import type { Cluster } from 'ioredis'
import { clientFile } from '../lib/http/client-route'
import { jobProgress, jobsProtocol, type JobProgressOptions } from '../lib/index'
import { scanProtocol, tokenSocketProtocol } from './protocols'

/** BullMQ's prefix on a Redis Cluster. */
export const CLUSTER_PREFIX = '{bull}'

/** The kinds of seed 000, at its exact paths. */
export const KINDS: JobProgressOptions['kinds'] = {
  batch: {},
  'structure-filter': { uploadPath: '/structure-filter/batch/upload' },
  dataset: {}
}

export interface ExampleConfig {
  redisUrl: string
  /** A Redis Cluster (REDIS_CLUSTER_NODES) used instead of `redisUrl`, with the prefix `{bull}`. */
  redisCluster?: Cluster
  sessionSecret?: string
  uploadDir?: string
  /** `key:owner,key2:owner2` */
  apiKeys?: string
  logger?: FastifyServerOptions['logger']
  /** The app's public base URL, for `ws_url` (PUBLIC_URL); without it `ws_url` is a path. */
  publicUrl?: string
  /** Every kind delivers its final states here, signed with `webhookSecret` (`whsec_...`). */
  webhookUrl?: string
  webhookSecret?: string
  /** Delivery tuning (tests and demos shorten the retries). */
  webhooks?: JobProgressOptions['webhooks']
  /** Extra plugin options (tests shorten intervals). */
  plugin?: Partial<JobProgressOptions>
}

export function parseApiKeys (value: string | undefined): Record<string, string> | undefined {
  if (value === undefined || value.trim() === '') return undefined
  const keys: Record<string, string> = {}
  for (const pair of value.split(',')) {
    const i = pair.indexOf(':')
    if (i <= 0 || i === pair.length - 1) throw new Error(`API_KEYS: expected "key:owner" pairs separated by commas, got "${pair}"`)
    keys[pair.slice(0, i).trim()] = pair.slice(i + 1).trim()
  }
  return keys
}

/** The page imports the client the plugin serves; `npm start` from a fresh clone builds it first. */
function ensureClientBuilt (): void {
  if (clientFile() !== null) return
  const root = join(__dirname, '..')
  execFileSync(process.execPath, [join(root, 'scripts', 'build-client.mjs'), '--js-only'], { cwd: root, stdio: 'inherit' })
}

/**
 * The example API: the plugin with seed 000's kinds, a demo page (the plugin adds its health,
 * readiness and metrics routes under /job-progress).
 */
export async function buildApp (config: ExampleConfig): Promise<FastifyInstance> {
  ensureClientBuilt()
  const app = Fastify({ logger: config.logger ?? false, trustProxy: true })
  const webhook = config.webhookUrl === undefined || config.webhookUrl === '' ? undefined : { url: config.webhookUrl }
  await app.register(jobProgress, {
    connection: config.redisCluster ?? config.redisUrl,
    // On a cluster every key of a queue must share a slot: a hash-tagged prefix (workers use it too).
    ...(config.redisCluster !== undefined ? { prefix: CLUSTER_PREFIX } : {}),
    // Prometheus metrics at /job-progress/metrics.
    metrics: true,
    kinds: webhook === undefined ? KINDS : Object.fromEntries(Object.entries(KINDS).map(([kind, k]) => [kind, { ...k, webhook }])),
    ...(webhook !== undefined ? { webhooks: { secret: config.webhookSecret, ...config.webhooks } } : {}),
    ...(config.sessionSecret !== undefined ? { session: { secret: config.sessionSecret } } : {}),
    ...(config.uploadDir !== undefined ? { uploadDir: config.uploadDir } : {}),
    apiKeys: parseApiKeys(config.apiKeys),
    ...(config.publicUrl !== undefined && config.publicUrl !== '' ? { publicUrl: config.publicUrl } : {}),
    // Seed 002 at its path; seed 001's and seed 003's dialects as protocols of our own.
    protocols: [jobsProtocol({ path: '/api/v1/ws/jobs' }), scanProtocol({ path: '/ws' }), tokenSocketProtocol({ path: '/api/v1/socket' })],
    // The page below imports the client from here, without a bundler.
    clientRoute: true, // /job-progress/client.js
    ...config.plugin
  })
  const page = await readFile(join(__dirname, 'public', 'index.html'), 'utf8')
  app.get('/', async (_req, reply) => await reply.type('text/html').send(page))
  return app
}
