import { Type, type Static } from '@sinclair/typebox'
import type { FastifyRequest } from 'fastify'
import type { LookupAddress } from 'node:dns'
import { Webhook } from 'standardwebhooks'

function validSecret (secret: string): boolean {
  try {
    return new Webhook(secret).sign('msg_check', new Date(), '').startsWith('v1,')
  } catch {
    return false
  }
}

/** Which job events a kind sends to its webhook. */
export const WEBHOOK_EVENTS = ['final', 'status', 'progress'] as const
export type WebhookEvent = typeof WEBHOOK_EVENTS[number]

// The defaults of a kind's webhook are applied by `kindWebhook` (TypeBox does not fill them in a record).
export const KindWebhookSchema = Type.Object({
  url: Type.Optional(Type.String({ pattern: '^https?://', description: 'fixed endpoint of the kind' })),
  allow: Type.Optional(Type.Array(Type.String({ minLength: 1 }), { description: 'host patterns a per-upload `webhook_url` may name' })),
  allowHttp: Type.Optional(Type.Boolean()),
  field: Type.Optional(Type.String({ minLength: 1 })),
  events: Type.Optional(Type.Array(Type.Union(WEBHOOK_EVENTS.map(e => Type.Literal(e))), { minItems: 1 })),
  progressIntervalSeconds: Type.Optional(Type.Number({ exclusiveMinimum: 0 }))
}, { additionalProperties: false })

/** A kind's webhook with its defaults. */
export interface KindWebhook {
  url?: string
  allow?: string[]
  allowHttp: boolean
  field: string
  events: WebhookEvent[]
  progressIntervalSeconds: number
}

export function kindWebhook (o: KindWebhookOptions): KindWebhook {
  return { allowHttp: false, field: 'webhook_url', events: ['final'], progressIntervalSeconds: 5, ...o }
}

export const WebhooksSchema = Type.Object({
  secret: Type.Optional(Type.Union([Type.String({ pattern: '^whsec_.+' }), Type.Array(Type.String({ pattern: '^whsec_.+' }), { minItems: 1 })])),
  queueName: Type.String({ minLength: 1, pattern: '^[^:]+$', default: 'jp-webhooks' }),
  worker: Type.Boolean({ default: true }),
  concurrency: Type.Integer({ minimum: 1, default: 10 }),
  attempts: Type.Integer({ minimum: 1, default: 13 }),
  backoffMs: Type.Integer({ minimum: 1, default: 30_000 }),
  maxBackoffMs: Type.Integer({ minimum: 1, default: 6 * 3600_000 }),
  jitter: Type.Number({ minimum: 0, maximum: 1, default: 0.2 }),
  connectTimeoutMs: Type.Integer({ minimum: 1, default: 5_000 }),
  timeoutMs: Type.Integer({ minimum: 1, default: 15_000 }),
  maxResponseBytes: Type.Integer({ minimum: 0, default: 4096 }),
  maxRetryAfterMs: Type.Integer({ minimum: 0, default: 6 * 3600_000 }),
  allowPrivateAddresses: Type.Boolean({ default: false }),
  keepDeliveredSeconds: Type.Integer({ minimum: 1, default: 24 * 3600 }),
  keepDeadSeconds: Type.Integer({ minimum: 1, default: 30 * 24 * 3600 }),
  urlTtlSeconds: Type.Integer({ minimum: 1, default: 7 * 24 * 3600 }),
  lockDurationMs: Type.Integer({ minimum: 100, default: 10_000 }),
  stalledIntervalMs: Type.Integer({ minimum: 100, default: 5_000 }),
  routePrefix: Type.String({ pattern: '^/', default: '/webhooks' })
}, { default: {}, additionalProperties: false })

/** Per-kind webhook options. */
export interface KindWebhookOptions {
  /**
   * Fixed endpoint that receives this kind's events, set by the operator (trusted: not checked
   * against private addresses). @default none
   */
  url?: string
  /**
   * Accept a per-upload endpoint in the form field {@link field} when its host matches one of
   * these patterns: `hooks.example.com`, `*.example.com` (any subdomain), `*` (any host), an
   * optional `:port`. Without it a per-upload endpoint is refused. @default none
   */
  allow?: string[]
  /** Accept `http:` per-upload endpoints too (https only otherwise). @default false */
  allowHttp?: boolean
  /** The upload's form field that names a per-upload endpoint. @default 'webhook_url' */
  field?: string
  /**
   * What is sent: `final` (succeeded, failed, cancelled), `status` (queued and running), and
   * `progress` (at most every {@link progressIntervalSeconds} per job). @default ['final']
   */
  events?: WebhookEvent[]
  /** Least time between two progress deliveries of one job. @default 5 */
  progressIntervalSeconds?: number
}

/** Plugin-wide webhook options; they apply to every kind that has a `webhook`. */
export interface WebhooksOptions {
  /**
   * Signing secrets (`whsec_` + base64), newest first. Each one signs every delivery, so a
   * receiver may rotate: add the new secret first, then drop the old one. Required when a kind
   * has a webhook.
   */
  secret?: string | string[]
  /** The delivery queue (BullMQ, under the plugin's `prefix`). @default 'jp-webhooks' */
  queueName?: string
  /** Run a delivery worker in this instance. @default true */
  worker?: boolean
  /** Deliveries in flight per instance. @default 10 */
  concurrency?: number
  /** Tries per delivery, the first included; the default spans about 20 hours. @default 13 */
  attempts?: number
  /** Delay before the first retry; it doubles with each retry. @default 30000 */
  backoffMs?: number
  /** Longest delay between two tries. @default 21600000 (6 h) */
  maxBackoffMs?: number
  /** Each delay is moved at random by up to this fraction, so retries do not arrive in waves. @default 0.2 */
  jitter?: number
  /** Time to open the connection (TLS included). @default 5000 */
  connectTimeoutMs?: number
  /** Time for the whole try: connection, request and response. @default 15000 */
  timeoutMs?: number
  /** Bytes of a response body read (kept for the dead-letter list); the rest is dropped. @default 4096 */
  maxResponseBytes?: number
  /** A receiver's `Retry-After` is honoured up to this. @default 21600000 (6 h) */
  maxRetryAfterMs?: number
  /**
   * Let per-upload endpoints resolve to loopback, private, link-local or metadata addresses.
   * @default false
   */
  allowPrivateAddresses?: boolean
  /** How long a delivered delivery is kept, which is also how long a repeated event is recognised. @default 86400 */
  keepDeliveredSeconds?: number
  /** How long a dead delivery stays listed and replayable. @default 2592000 (30 days) */
  keepDeadSeconds?: number
  /** How long a per-upload endpoint is kept for a job that has not ended. @default 604800 (7 days) */
  urlTtlSeconds?: number
  /**
   * A delivery whose instance died is taken over once its lock lapsed, at most this plus
   * {@link stalledIntervalMs} after the death (the lock is renewed every half of it while the
   * delivery runs). @default 10000
   */
  lockDurationMs?: number
  /** How often deliveries of dead instances are looked for (one script per instance). @default 5000 */
  stalledIntervalMs?: number
  /** Prefix of the dead-letter routes. @default '/webhooks' */
  routePrefix?: string
  /**
   * Who may list and replay dead deliveries. Without it the dead-letter routes are not
   * registered (they show other owners' endpoints and results). @default none
   */
  authorize?: (request: FastifyRequest) => boolean | Promise<boolean>
  /** Name resolution for endpoints. @default dns.promises.lookup */
  lookup?: (hostname: string) => Promise<LookupAddress[]>
}

export type ResolvedWebhooks = Static<typeof WebhooksSchema> & Pick<WebhooksOptions, 'authorize' | 'lookup'>

const FUNCTIONS = ['authorize', 'lookup'] as const

/**
 * Takes the function-valued webhook options out before the options are cloned and checked, and
 * returns a function that puts them back; problems are pushed to `problems`.
 */
export function keepWebhookFunctions (raw: Record<string, unknown>, problems: string[]): (opts: Record<string, unknown>) => void {
  const hooks = raw.webhooks
  const kinds = raw.kinds !== null && typeof raw.kinds === 'object' ? Object.entries(raw.kinds as Record<string, { webhook?: unknown }>) : []
  const secret = (hooks as { secret?: unknown } | undefined)?.secret
  for (const [kind, k] of kinds) {
    if (k?.webhook !== undefined && secret === undefined) problems.push(`kind "${kind}" has a webhook: \`webhooks.secret\` (a \`whsec_\` secret) is required to sign it`)
  }
  for (const s of typeof secret === 'string' ? [secret] : Array.isArray(secret) ? secret : []) {
    if (typeof s === 'string' && s.startsWith('whsec_') && !validSecret(s)) problems.push('`webhooks.secret`: a `whsec_` secret must be followed by base64')
  }
  if (hooks === null || typeof hooks !== 'object') return () => {}
  const copy: Record<string, unknown> = { ...hooks }
  const kept: Record<string, unknown> = {}
  for (const name of FUNCTIONS) {
    if (copy[name] === undefined) continue
    if (typeof copy[name] !== 'function') problems.push(`\`webhooks.${name}\` must be a function`)
    kept[name] = copy[name]
    delete copy[name]
  }
  raw.webhooks = copy
  return (opts) => { Object.assign(opts.webhooks as object, kept) }
}
