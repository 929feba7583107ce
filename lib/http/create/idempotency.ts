import type { FastifyRequest } from 'fastify'
import type { Redis } from 'ioredis'
import { createHash } from 'node:crypto'
import { IdempotencyKeyInProgressError, IdempotencyKeyInvalidError, IdempotencyKeyReusedError } from '../../errors'
import type { Keys } from '../../core/keys'

/** Printable ASCII, as Stripe-style clients send (a UUID, a hash ...). */
const KEY = /^[\x21-\x7e]{1,255}$/

/**
 * The `Idempotency-Key` of a request, or undefined when it sends none; a malformed key is
 * refused before any byte of the body is read.
 */
export function idempotencyKeyOf (request: FastifyRequest): string | undefined {
  const value = request.headers['idempotency-key']
  if (value === undefined) return undefined
  if (typeof value !== 'string' || !KEY.test(value)) throw new IdempotencyKeyInvalidError()
  return value
}

/** A stable digest of a JSON value (object keys sorted), to tell one request body from another. */
export function fingerprint (value: unknown): string {
  const canonical = (v: unknown): unknown => {
    if (Array.isArray(v)) return v.map(canonical)
    if (v !== null && typeof v === 'object') {
      return Object.fromEntries(Object.keys(v).sort().map(k => [k, canonical((v as Record<string, unknown>)[k])]))
    }
    return v
  }
  return createHash('sha256').update(JSON.stringify(canonical(value)) ?? 'undefined').digest('hex')
}

/** Marks the claim done once its job was added, keeping its expiry; only when it is still ours. */
const CONFIRM = `
local v = redis.call("GET", KEYS[1])
if not v then return 0 end
local claim = cjson.decode(v)
if claim.jobId ~= ARGV[1] then return 0 end
claim.pending = false
return redis.call("SET", KEYS[1], cjson.encode(claim), "KEEPTTL") and 1 or 0
`

/** How long a repeated request waits for the first one with its key to add its job. */
const WAIT_MS = 10_000
const POLL_MS = 50

/** Deletes the claim only when it is still the given job's: a later claim is never removed. */
const RELEASE = `
local v = redis.call("GET", KEYS[1])
if v and cjson.decode(v).jobId == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
`

/**
 * Idempotency keys, kept in Redis for `windowSeconds`: the first request with a key claims it
 * with `SET NX` just before its job is added, so of two requests raced on two instances exactly
 * one adds a job and the other answers with that job. The claim holds a digest of the request,
 * so the same key sent with another body is refused (422) instead of silently answered with a
 * job made from different input. Keys live in the queue's key space, one per owner and key:
 * two owners may use the same key.
 */
export class Idempotency {
  readonly #redis: Redis
  readonly #keys: Keys
  readonly #windowSeconds: number

  constructor (redis: Redis, keys: Keys, windowSeconds: number) {
    this.#redis = redis
    this.#keys = keys
    this.#windowSeconds = windowSeconds
  }

  #key (queue: string, owner: string, key: string): string {
    const id = createHash('sha256').update(owner).update('\0').update(key).digest('hex')
    return this.#keys.idempotency(queue, id)
  }

  /**
   * The job that answers a repeated request. A claim whose job is still being added is waited
   * for: answering with its id at once would name a job that may never exist (its add can
   * fail). Null when the claim was given back meanwhile.
   */
  async #settled (queue: string, name: string, stored: string, digest: string): Promise<string | null> {
    const deadline = Date.now() + WAIT_MS
    for (;;) {
      // `pending` is absent from claims written before it existed: those are done.
      const claim = JSON.parse(stored) as { jobId: string, digest: string, pending?: boolean }
      if (claim.digest !== digest) throw new IdempotencyKeyReusedError()
      if (claim.pending !== true) return claim.jobId
      // Its job exists although the claim was not marked done (that write failed): it is done.
      if (await this.#redis.exists(this.#keys.job(queue, claim.jobId)) === 1) return claim.jobId
      if (Date.now() > deadline) throw new IdempotencyKeyInProgressError()
      await new Promise(resolve => setTimeout(resolve, POLL_MS))
      const next = await this.#redis.get(name)
      if (next === null) return null
      stored = next
    }
  }

  /** The job a previous request with this key made, or null when the key is new. */
  async lookup (queue: string, owner: string, key: string, digest: string): Promise<string | null> {
    const name = this.#key(queue, owner, key)
    const stored = await this.#redis.get(name)
    return stored === null ? null : await this.#settled(queue, name, stored, digest)
  }

  /** Whether a request already claimed this key (its job may still be being added). */
  async held (queue: string, owner: string, key: string): Promise<boolean> {
    return await this.#redis.exists(this.#key(queue, owner, key)) === 1
  }

  /** Claims the key for `jobId`; resolves with the job that holds it (ours, or the winner's). */
  async claim (queue: string, owner: string, key: string, digest: string, jobId: string): Promise<string> {
    const name = this.#key(queue, owner, key)
    const value = JSON.stringify({ jobId, digest, pending: true })
    const set = await this.#redis.set(name, value, 'EX', this.#windowSeconds, 'NX')
    if (set === 'OK') return jobId
    const stored = await this.#redis.get(name)
    // Released before we could read it (the winner's job could not be added): try again.
    const holder = stored === null ? null : await this.#settled(queue, name, stored, digest)
    return holder ?? await this.claim(queue, owner, key, digest, jobId)
  }

  /** Marks the key's claim done once its job exists: repeated requests are answered with it. */
  async confirm (queue: string, owner: string, key: string, jobId: string): Promise<void> {
    await this.#redis.eval(CONFIRM, 1, this.#key(queue, owner, key), jobId)
  }

  /** Gives the key back after the job could not be added, so a retry can make it. */
  async release (queue: string, owner: string, key: string, jobId: string): Promise<void> {
    await this.#redis.eval(RELEASE, 1, this.#key(queue, owner, key), jobId)
  }
}
