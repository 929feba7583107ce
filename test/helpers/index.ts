import Fastify, { type FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { setTimeout as sleep } from 'node:timers/promises'
import WebSocket from 'ws'
import { createJobWorker, DiskStorage, jobProgress, jobsProtocol, type JobContext, type JobProgressOptions } from '../../lib/index'
import { freePort, RedisServer } from './redis'
import { mkdtempTracked, removeTracked } from './tracked'

export { RedisServer, freePort } from './redis'

interface Teardown { teardown: (fn: () => unknown) => void }

/** A private Redis for the whole test file, stopped when the file ends. */
export async function redisFor (t: Teardown): Promise<RedisServer> {
  const redis = await RedisServer.start()
  t.teardown(async () => await redis.stop())
  return redis
}

/** A temp directory removed at teardown. */
export async function tempDir (t: Teardown, name = 'jp-test-'): Promise<string> {
  const dir = mkdtempTracked(name)
  t.teardown(() => removeTracked(dir))
  return dir
}

export interface TestApp {
  app: FastifyInstance
  url: string
  ws: string
  storage: DiskStorage
  uploadDir: string
}

/** What every test app starts from: two kinds, a session secret, no throttle, a quick bridge takeover. */
export const TEST_OPTIONS = {
  kinds: { batch: {}, dataset: {} },
  session: { secret: 'a-test-secret-of-enough-length' },
  throttleMs: 0,
  bridge: { claimIdleMs: 1000, claimIntervalMs: 500 }
} satisfies Partial<JobProgressOptions>

/** Builds an app with the plugin on a random port; closed at teardown. */
export async function startApp (t: Teardown, redis: RedisServer, opts: Partial<JobProgressOptions> = {}, setup?: (app: FastifyInstance) => void | Promise<void>): Promise<TestApp> {
  const uploadDir = opts.uploadDir ?? await tempDir(t, 'jp-uploads-')
  for (let attempt = 1; ; attempt++) {
    const app = Fastify({ logger: false })
    if (setup !== undefined) await setup(app)
    // The port is chosen first so that the app's public URL (and so `ws_url`) can name it.
    const port = await freePort()
    await app.register(jobProgress, {
      connection: redis.url,
      publicUrl: `http://127.0.0.1:${port}`,
      ...TEST_OPTIONS,
      ...opts,
      uploadDir
    })
    try {
      await app.listen({ port, host: '127.0.0.1' })
    } catch (err) {
      await app.close()
      // Another process took the port between the draw and the listen: a new app on a new port.
      if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE' && attempt < 3) continue
      throw err
    }
    t.teardown(async () => await app.close())
    return { app, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}`, storage: new DiskStorage(uploadDir), uploadDir }
  }
}

/** Items per line of an uploaded file, as the test worker reads them. */
/** The API keys of {@link twoApps}: alice's and bob's. */
export const TWO_APP_KEYS = { 'key-alice': 'alice', 'key-bob': 'bob' }
/** Where {@link twoApps} serves the `jobs` protocol. */
export const JOBS_PATH = '/ws/jobs'

/** Two instances on one Redis and one upload directory, with alice's and bob's API keys and the `jobs` protocol. */
export async function twoApps (t: Teardown, opts: Partial<JobProgressOptions> = {}): Promise<{ redis: RedisServer, a: TestApp, b: TestApp }> {
  const redis = await redisFor(t)
  const options = { apiKeys: TWO_APP_KEYS, protocols: [jobsProtocol({ path: JOBS_PATH })], ...opts }
  const a = await startApp(t, redis, options)
  const b = await startApp(t, redis, { ...options, uploadDir: a.uploadDir })
  return { redis, a, b }
}

/** A client with an API key on `app`'s jobs socket (at {@link JOBS_PATH}), once it has seen `connected`. */
export async function jobsClient (t: Teardown, app: { ws: string }, key: string): Promise<Client> {
  const client = connect(t, `${app.ws}${JOBS_PATH}?api_key=${key}`)
  await client.waitFor(m => m.type === 'connected')
  return client
}

/** An ioredis client of `redis`, disconnected when the test ends. */
export function redisClient (t: Teardown, redis: RedisServer): Redis {
  const r = new Redis(redis.url)
  t.teardown(() => r.disconnect())
  return r
}

/** Uploads with an API key; resolves with the job id (throws unless accepted). */
export async function uploadAs (app: TestApp, key: string, kind = 'batch', content = lines(1)): Promise<string> {
  const up = await upload(`${app.url}/${kind}/upload`, content, { headers: { authorization: `Bearer ${key}` } })
  if (up.status !== 202) throw new Error(`upload failed: ${up.status}`)
  return up.body.job_id
}

export function lines (n: number, fail?: number): string {
  return Array.from({ length: n }, (_, i) => (i + 1 === fail ? 'FAIL' : `item-${i + 1}`)).join('\n') + '\n'
}

export interface WorkerHooks {
  /** Awaited before each item: lets a test hold the job at an exact point. */
  beforeItem?: (index: number, ctx: JobContext) => Promise<void> | void
  delayMs?: number
}

/**
 * A real BullMQ worker (through the plugin's helper) that reads the uploaded file line by line,
 * reports after each line, fails on a line `FAIL`, and returns `{ lines }`.
 */
export function startWorker (t: Teardown, redis: RedisServer, kind: string, uploadDir: string, hooks: WorkerHooks = {}, extra: Partial<Parameters<typeof createJobWorker>[0]> = {}) {
  const worker = createJobWorker({ kind, connection: redis.url, storage: new DiskStorage(uploadDir), ...extra }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    const items = text.split('\n').filter(Boolean)
    for (let i = 0; i < items.length; i++) {
      await hooks.beforeItem?.(i, ctx)
      if (hooks.delayMs !== undefined) await sleep(hooks.delayMs)
      if (items[i] === 'FAIL') throw new Error(`record on line ${i + 1} is FAIL`)
      await ctx.report(i + 1, items.length)
    }
    return { lines: items.length }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    // ioredis never emits 'end' for a client disconnected while it waits to reconnect, and BullMQ's
    // close waits for that 'end' on its blocking connection: after a Redis restart a close could
    // hang. Past a deadline that client is marked ended (ioredis's own status change), which frees it.
    let timer: NodeJS.Timeout | undefined
    const closing = worker.close()
    const late = await Promise.race([closing.then(() => false), new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(true), 2_000) })])
    clearTimeout(timer)
    if (!late) return
    const blocking = await (worker as any).backend?.blockingConnection?.client
    if (blocking?.status === 'reconnecting') blocking.setStatus('end')
    await closing
  })
  return worker
}

export interface UploadReply {
  status: number
  body: any
  cookie: string | undefined
}

/** A real multipart upload with fetch's FormData. */
export async function upload (url: string, content: string | Buffer | null, opts: { cookie?: string, filename?: string, type?: string, fields?: Record<string, string>, headers?: Record<string, string>, files?: number } = {}): Promise<UploadReply> {
  const form = new FormData()
  for (const [k, v] of Object.entries(opts.fields ?? {})) form.append(k, v)
  if (content !== null) {
    for (let i = 0; i < (opts.files ?? 1); i++) form.append('file', new Blob([content], { type: opts.type ?? 'text/plain' }), opts.filename ?? 'records.txt')
  }
  const res = await fetch(url, { method: 'POST', body: form, headers: { ...(opts.cookie !== undefined ? { cookie: opts.cookie } : {}), ...opts.headers } })
  const setCookie = res.headers.get('set-cookie')
  const text = await res.text()
  let body: unknown = text
  try { body = JSON.parse(text) } catch {}
  return { status: res.status, body, cookie: setCookie === null ? opts.cookie : setCookie.split(';')[0] }
}

/** A real `ws` client that records what it receives, with promises to wait on events. */
export class Client {
  readonly socket: WebSocket
  readonly messages: any[] = []
  readonly closed: Promise<{ code: number, reason: string }>
  readonly opened: Promise<void>
  #waiters: Array<{ test: (m: any) => boolean, resolve: (m: any) => void }> = []

  constructor (url: string, opts: WebSocket.ClientOptions & { protocols?: string | string[] } = {}) {
    this.socket = new WebSocket(url, opts.protocols, opts)
    this.socket.on('error', () => {})
    this.opened = new Promise(resolve => this.socket.once('open', () => resolve()))
    this.closed = new Promise(resolve => this.socket.once('close', (code, reason) => resolve({ code, reason: reason.toString() })))
    this.socket.on('message', (data) => {
      let message: any = data.toString()
      try { message = JSON.parse(message) } catch {}
      this.messages.push(message)
      this.#waiters = this.#waiters.filter(w => {
        if (!w.test(message)) return true
        w.resolve(message)
        return false
      })
    })
  }

  /**
   * Resolves with the first message (already received or to come) that passes `test`. Rejects
   * once the socket closes without one (with the close's code and reason), or after `timeoutMs`.
   */
  async waitFor (test: (m: any) => boolean, timeoutMs = 15_000): Promise<any> {
    const seen = this.messages.find(test)
    if (seen !== undefined) return seen
    const got = (): string => `got ${JSON.stringify(this.messages).slice(0, 500)}`
    return await new Promise((resolve, reject) => {
      const waiter = { test, resolve: (m: any) => { clearTimeout(timer); resolve(m) } }
      const fail = (err: Error): void => {
        clearTimeout(timer)
        this.#waiters = this.#waiters.filter(w => w !== waiter)
        reject(err)
      }
      const timer = setTimeout(() => fail(new Error(`no such message within ${timeoutMs} ms; ${got()}`)), timeoutMs)
      this.#waiters.push(waiter)
      // Messages are handled before the close event: a waiter still here then has missed its message.
      void this.closed.then(({ code, reason }) => { if (this.#waiters.includes(waiter)) fail(new Error(`closed (${code}${reason === '' ? '' : ` ${reason}`}) with no such message; ${got()}`)) })
    })
  }

  send (data: unknown): void {
    this.socket.send(typeof data === 'string' ? data : JSON.stringify(data))
  }

  close (): void {
    this.socket.terminate()
  }
}

/** Opens a client and ends it at teardown. */
export function connect (t: Teardown, url: string, opts: WebSocket.ClientOptions & { protocols?: string | string[], cookie?: string } = {}): Client {
  const headers = { ...(opts.headers ?? {}), ...(opts.cookie !== undefined ? { cookie: opts.cookie } : {}) }
  const client = new Client(url, { ...opts, headers })
  t.teardown(() => client.close())
  return client
}

/** Files in a directory (none when it does not exist yet: DiskStorage makes it on first write). */
export async function filesIn (dir: string): Promise<string[]> {
  const { readdir } = await import('node:fs/promises')
  try {
    return await readdir(dir)
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return []
    throw err
  }
}

/**
 * The BullMQ job hashes of a queue (`<prefix>:<queue>:<uuid>`), read with a fresh connection:
 * what an upload that failed must not leave behind.
 */
export async function jobKeys (redis: RedisServer, queue = 'batch', prefix = 'bull'): Promise<string[]> {
  const client = redis.client()
  try {
    const keys = await client.keys(`${prefix}:${queue}:*`)
    // Exactly `<prefix>:<queue>:<uuid>`: not the plugin's per-job keys in the queue's space (`jp:upload:<uuid>`).
    return keys.filter(k => /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(k.slice(`${prefix}:${queue}:`.length)))
  } finally {
    client.disconnect()
  }
}

/** Polls `check` until it returns true, a few times with short intervals; false when it never did. */
export async function eventually (check: () => boolean | Promise<boolean>, timeoutMs = 5_000, intervalMs = 25): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    if (await check()) return true
    if (Date.now() > deadline) return false
    await sleep(intervalMs)
  }
}

/** A promise with its resolve, to hold a worker at an exact point until the test lets it go. */
export function gate<T = void> (): { promise: Promise<T>, open: (value: T) => void } {
  let open!: (value: T) => void
  const promise = new Promise<T>(resolve => { open = resolve })
  return { promise, open }
}

/** Resolves with the milliseconds `promise` took, or null when it had not settled after `capMs`. */
export async function timed (promise: Promise<unknown>, capMs: number): Promise<number | null> {
  const started = Date.now()
  let timer: NodeJS.Timeout | undefined
  const done = await Promise.race([
    promise.then(() => true, () => true),
    new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(false), capMs) })
  ])
  clearTimeout(timer)
  return done ? Date.now() - started : null
}
