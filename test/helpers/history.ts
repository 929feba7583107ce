import { UnrecoverableError } from 'bullmq'
import { Redis } from 'ioredis'
import { setTimeout as sleep } from 'node:timers/promises'
import type { Page } from 'playwright-core'
import WebSocket from 'ws'
import { createJobWorker, DiskStorage } from '../../lib/index'
import { compareEntryIds, parseVersion } from '../../lib/wire/version'
import { browserPage, startNginx } from './browser'
import { LOAD_TS, Proc, SESSION_SECRET, type Api } from './cluster'
import { tempDir, upload } from './index'
import { freePort, RedisServer } from './redis'
import { newSecret, Receiver } from './receiver'
import { sse as openSse, type SseClient } from './sse'

// The history checker (issue 26, item 5). A worker in this process runs random jobs; a reader
// of the queue's event stream, on a connection of this process, records every entry: that is
// each job's TRUE history, and each entry's id is exactly the stream entry id of the version
// the plugin gives the state it produced (`<attempt>.<entry id>`, lib/wire/version.ts). Watchers
// on every transport record what they receive; faults are injected while the jobs run; then each
// watcher's record is checked against the truth:
//   - versioned watchers (jobs protocol, SSE, the client, the feed, webhooks): versions never go
//     back, and the state at each version is the true state at that stream position;
//   - unversioned watchers (seed 000's per-job socket, seed 001's dialect, the status route): the
//     states received are a subsequence of the true states, in order;
//   - every watcher ends with the true final state within the stated bound.

interface Teardown { teardown: (fn: () => unknown) => void }

export const QUEUE = 'batch'
export const EVENTS_KEY = `bull:${QUEUE}:events`

// ---------------------------------------------------------------------------------------------
// Random jobs

export interface Plan {
  /** Stages whose counts restart: `parse` 0..n, then `check` 0..m. */
  stages: Array<{ name: string, n: number }>
  /** Report numbers (1-based, over the whole job) followed by a message-only update. */
  messagesAfter: number[]
  /** The first attempt fails after this report (the job has 2 attempts). */
  failFirstAfter?: number
  outcome: 'complete' | 'fail' | 'cancel'
  /** The report after which the job fails for good, or is cancelled through the cancel route. */
  endAfter?: number
  /** Pause before each report. */
  stepMs: number
}

/** A small seeded generator, so a run can be repeated (`seed` in the options). */
export function rng (seed: number): () => number {
  let s = seed >>> 0
  return () => {
    s = (s + 0x6D2B79F5) >>> 0
    let x = s
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

export function randomPlan (random: () => number, stepMs: number): Plan {
  const int = (lo: number, hi: number): number => lo + Math.floor(random() * (hi - lo + 1))
  // Different totals per stage, so a state (processed, total) names its stage.
  const n = int(3, 7)
  const stages = [{ name: 'parse', n }, { name: 'check', n: n + int(1, 4) }]
  const reports = stages.reduce((sum, s) => sum + s.n + 1, 0)
  const messagesAfter = [int(1, reports), int(1, reports)].filter((x, i, all) => all.indexOf(x) === i)
  const r = random()
  const plan: Plan = { stages, messagesAfter, outcome: r < 0.55 ? 'complete' : r < 0.8 ? 'fail' : 'cancel', stepMs }
  if (random() < 0.35) plan.failFirstAfter = int(2, reports - 1)
  if (plan.outcome !== 'complete') plan.endAfter = int(2, reports - 1)
  return plan
}

/** A one-line description of a plan for failure messages. */
export function describePlan (plan: Plan): string {
  const stages = plan.stages.map(s => `${s.name} 0..${s.n}`).join(', then ')
  const retry = plan.failFirstAfter !== undefined ? `; attempt 1 fails after report ${plan.failFirstAfter}` : ''
  const end = plan.outcome === 'complete' ? 'completes' : `${plan.outcome === 'fail' ? 'fails' : 'is cancelled'} after report ${plan.endAfter ?? 0}`
  return `${stages}; messages after reports ${plan.messagesAfter.join(', ')}${retry}; ${end}`
}

/**
 * The worker of the run, in this process: it reads the job's plan from the uploaded file, reports
 * as planned (each report carries `data.seq`, its number in the attempt) and, at a cancel point,
 * waits until the test cancelled the job through the plugin's route.
 */
export function planWorker (t: Teardown, redis: RedisServer, uploadDir: string, onCancelPoint: (jobId: string) => Promise<void>, concurrency: number) {
  const storage = new DiskStorage(uploadDir)
  const worker = createJobWorker({ kind: QUEUE, connection: redis.url, storage, workerOptions: { concurrency } }, async (ctx) => {
    let text = ''
    for await (const chunk of ctx.open()) text += String(chunk)
    const plan = JSON.parse(text) as Plan
    const attempt = ctx.job.attemptsStarted
    let seq = 0
    const report = async (processed: number, total: number, stage: string, message?: string): Promise<void> => {
      await sleep(plan.stepMs)
      await ctx.report(processed, total, { stage, ...(message !== undefined ? { message } : {}), data: { seq: ++seq } })
    }
    let k = 0
    for (const stage of plan.stages) {
      for (let i = 0; i <= stage.n; i++) {
        await report(i, stage.n, stage.name)
        k++
        if (plan.messagesAfter.includes(k)) await report(i, stage.n, stage.name, `note after report ${k}`)
        if (attempt === 1 && plan.failFirstAfter === k) throw new Error(`attempt 1 fails after report ${k}`)
        if (plan.endAfter === k && plan.outcome === 'fail') throw new UnrecoverableError(`planned failure after report ${k}`)
        if (plan.endAfter === k && plan.outcome === 'cancel') await onCancelPoint(ctx.job.id as string)
      }
    }
    return { reports: k }
  })
  worker.on('error', () => {})
  t.teardown(async () => {
    // BullMQ's close can wait for a blocking connection that never ends after a Redis restart
    // (see test/helpers/index.ts): past a deadline the client is ended by hand.
    let timer: NodeJS.Timeout | undefined
    const closing = worker.close(true)
    const late = await Promise.race([closing.then(() => false), new Promise<boolean>(resolve => { timer = setTimeout(() => resolve(true), 2_000) })])
    clearTimeout(timer)
    if (!late) return
    const blocking = await (worker as any).blockingConnection?.client
    blocking?.disconnect?.()
    await Promise.race([closing, sleep(2_000)])
  })
  return worker
}

// ---------------------------------------------------------------------------------------------
// The truth: the queue's event stream, read as it is written

export interface Entry { id: string, fields: Record<string, string> }

export type Status = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled'

/** One state of a job's true history: the state each stream entry of the job produced. */
export interface TrueState {
  id: string
  event: string
  attempt: number
  status: Status
  /** Set on `progress` entries and carried to the final `completed` state. */
  processed?: number
  total?: number
  /** The last report's counts before this entry (what a snapshot of a non-progress state may show). */
  carried?: { processed: number, total: number }
  final: boolean
  /** The entry's time (Redis's clock, the entry id's milliseconds). */
  t: number
}

/**
 * Reads the queue's event stream from its start on a connection of this process (faults spare
 * it), keeping every entry by job. A trim takes the entries it would remove first, in the same
 * MULTI, so nothing the checker needs is lost.
 */
export class StreamRecorder {
  readonly byJob = new Map<string, Entry[]>()
  readonly ids = new Set<string>()
  #last = '0-0'
  #stopped = false
  #conn: Redis
  #loop: Promise<void>
  #waiters: Array<() => void> = []

  constructor (redis: RedisServer) {
    this.#conn = redis.client()
    this.#loop = this.#run()
  }

  async #run (): Promise<void> {
    while (!this.#stopped) {
      try {
        const reply = await this.#conn.xread('COUNT', 1000, 'BLOCK', 500, 'STREAMS', EVENTS_KEY, this.#last)
        for (const [, entries] of reply ?? []) this.add(entries)
      } catch {
        if (!this.#stopped) await sleep(50)
      }
    }
  }

  add (entries: Array<[string, string[]]>): void {
    for (const [id, raw] of entries) {
      if (compareEntryIds(id, this.#last) > 0) this.#last = id
      if (this.ids.has(id)) continue
      this.ids.add(id)
      const fields: Record<string, string> = {}
      for (let i = 0; i < raw.length; i += 2) fields[raw[i]] = raw[i + 1]
      if (fields.jobId === undefined) continue
      const list = this.byJob.get(fields.jobId) ?? []
      list.push({ id, fields })
      list.sort((a, b) => compareEntryIds(a.id, b.id))
      this.byJob.set(fields.jobId, list)
    }
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }

  /** Resolves once `check` holds, re-checked after each batch of entries. */
  async until (what: string, check: () => boolean, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!check()) {
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting until ${what}`)
      await new Promise<void>(resolve => {
        const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()))
        this.#waiters.push(() => { clearTimeout(timer); resolve() })
      })
    }
  }

  /** The fault "stream trimmed past the bridge": XTRIM MAXLEN 0, the entries recorded first. */
  async trim (conn: Redis): Promise<number> {
    const reply = await conn.multi().xrange(EVENTS_KEY, '-', '+').xtrim(EVENTS_KEY, 'MAXLEN', 0).exec()
    if (reply === null) throw new Error('the trim transaction was aborted')
    const [[err, entries], [err2, removed]] = reply as Array<[Error | null, any]>
    if (err !== null || err2 !== null) throw err ?? err2
    this.add(entries)
    return Number(removed)
  }

  /**
   * Whether every entry ever added to the stream was recorded (Redis 7's `entries-added`): the
   * truth is then complete, whatever was trimmed. Null when the server does not say.
   */
  async missing (conn: Redis): Promise<number | null> {
    const info = await conn.call('XINFO', 'STREAM', EVENTS_KEY) as unknown[]
    const at = info.indexOf('entries-added')
    if (at < 0) return null
    return Number(info[at + 1]) - this.ids.size
  }

  truth (jobId: string): TrueState[] {
    return trueHistory(this.byJob.get(jobId) ?? [])
  }

  async stop (): Promise<void> {
    this.#stopped = true
    this.#conn.disconnect()
    await this.#loop
  }
}

/** The states a job's stream entries produced, in stream order. */
export function trueHistory (entries: Entry[]): TrueState[] {
  const states: TrueState[] = []
  let started = 0
  let last: { processed: number, total: number } | undefined
  for (const { id, fields } of entries) {
    const t = Number(id.slice(0, id.indexOf('-')))
    const base = { id, event: fields.event, t, final: false, ...(last !== undefined ? { carried: last } : {}) }
    switch (fields.event) {
      case 'added':
      case 'waiting':
      case 'delayed':
      case 'stalled':
        // `waiting` after `active` is a retry: queued for the next attempt.
        states.push({ ...base, attempt: started + 1, status: 'queued' })
        break
      case 'active':
        states.push({ ...base, attempt: ++started, status: 'running' })
        break
      case 'progress': {
        const d = JSON.parse(fields.data ?? '{}') as { processed?: number, total?: number, attempt?: number }
        last = { processed: d.processed ?? 0, total: d.total ?? 0 }
        states.push({ ...base, attempt: d.attempt ?? started, status: 'running', ...last })
        break
      }
      case 'completed':
        states.push({ ...base, attempt: started, status: 'succeeded', final: true, ...(last ?? { processed: 0, total: 0 }) })
        break
      case 'failed':
        states.push({ ...base, attempt: started, status: 'failed', final: true })
        break
      case 'cancelled':
        states.push({ ...base, attempt: Math.max(started, 1), status: 'cancelled', final: true })
        break
      default:
        // removed, retries-exhausted, duplicated ...: no state of their own.
        break
    }
  }
  return states
}

// ---------------------------------------------------------------------------------------------
// What watchers receive

export type Transport = 'progress' | 'jobs' | 'scan' | 'sse' | 'polling' | 'browser' | 'feed' | 'webhook'
export const TRANSPORTS: Transport[] = ['progress', 'jobs', 'scan', 'sse', 'polling', 'browser', 'feed', 'webhook']

/** Transports whose messages carry a version; the others are checked by their states' order. */
const VERSIONED = new Set<Transport>(['jobs', 'sse', 'browser', 'feed', 'webhook'])

export interface Observation {
  at: number
  status: Status | 'processing'
  processed?: number
  total?: number
  /** The entry id of the message's version. */
  entry?: string
  attempt?: number
  /** What was received, for failure messages. */
  raw: string
}

/** One transport watching one job. */
export class Watcher {
  readonly transport: Transport
  readonly jobId: string
  readonly obs: Observation[] = []
  finalAt: number | null = null
  /** Index in `obs` of the first final message. */
  finalIndex = -1
  readonly final: Promise<void>
  #resolve!: () => void
  notes: string[] = []

  constructor (transport: Transport, jobId: string) {
    this.transport = transport
    this.jobId = jobId
    this.final = new Promise(resolve => { this.#resolve = resolve })
  }

  get done (): boolean {
    return this.finalAt !== null
  }

  get name (): string {
    return `${this.transport} watcher of job ${this.jobId}`
  }

  push (o: Observation): void {
    this.obs.push(o)
    if (o.status !== 'queued' && o.status !== 'running' && o.status !== 'processing' && this.finalAt === null) {
      this.finalAt = o.at
      this.finalIndex = this.obs.length - 1
      this.#resolve()
    }
  }
}

const SEED_STATUS: Record<string, Observation['status']> = { processing: 'processing', complete: 'succeeded', failed: 'failed', cancelled: 'cancelled' }
const SCAN_STATUS: Record<string, Observation['status']> = { calculating: 'processing', optimal: 'succeeded', failed: 'failed', cancelled: 'cancelled' }

function versioned (status: Observation['status'], m: { processed?: unknown, total?: unknown, version?: unknown }, raw: unknown): Observation {
  const v = parseVersion(m.version)
  return {
    at: Date.now(),
    status,
    ...(typeof m.processed === 'number' ? { processed: m.processed } : {}),
    ...(typeof m.total === 'number' ? { total: m.total } : {}),
    ...(v !== null ? { entry: `${v.ms}-${v.seq}`, attempt: v.attempt } : {}),
    raw: JSON.stringify(raw)
  }
}

function seedObservation (m: any, statuses = SEED_STATUS): Observation {
  return { at: Date.now(), status: statuses[m.status] ?? m.status, processed: m.processed, total: m.total, raw: JSON.stringify(m) }
}

// ---------------------------------------------------------------------------------------------
// The checker

export interface Fault { name: string, start: number, end: number }

export interface Verdict {
  watcher: Watcher
  ok: boolean
  /** Why not, in words. */
  problem?: string
  /** From the true final to the watcher's first final message (ms), when it got one. */
  latencyMs?: number
  deadline: number
}

const render = (o: Observation): string => o.raw.length > 240 ? o.raw.slice(0, 240) + '…' : o.raw
const describe = (s: TrueState): string => `${s.event} ${s.status}${s.processed !== undefined ? ` ${s.processed}/${s.total}` : ''} (version ${s.attempt}.${s.id})`

/** The deadline for a watcher's final: the bound after the true final, restarted by every fault that began before it passed. */
export function deadlineFor (finalAt: number, faults: Fault[], boundMs: number): number {
  let d = finalAt + boundMs
  for (const f of [...faults].sort((a, b) => a.start - b.start)) if (f.start < d) d = Math.max(d, f.end + boundMs)
  return d
}

/** Whether an unversioned observation shows the true state `s`. */
function showsUnversioned (o: Observation, s: TrueState): boolean {
  const status = s.final ? s.status : 'processing'
  const seen = o.status === 'queued' || o.status === 'running' ? 'processing' : o.status
  if (seen !== status) return false
  if (s.status === 'failed' || s.status === 'cancelled') return true
  if (s.processed !== undefined) return o.processed === s.processed && o.total === s.total
  // A queued or active state shows no counts of its own: 0/0 or the last report's.
  return (o.processed === 0 && o.total === 0) || (s.carried !== undefined && o.processed === s.carried.processed && o.total === s.carried.total)
}

/** Whether a versioned observation shows the true state `s` at its version. */
function showsVersioned (o: Observation, s: TrueState | undefined): string | null {
  if (s === undefined) return o.status === 'queued' ? null : `status ${o.status} before the job's first entry`
  if (o.status !== s.status) return `status ${o.status}, but the true state there is ${describe(s)}`
  if (o.attempt !== undefined && o.attempt !== s.attempt) return `attempt ${o.attempt}, but the true state there is ${describe(s)}`
  if (s.processed !== undefined && o.processed !== undefined && (o.processed !== s.processed || o.total !== s.total)) return `${o.processed}/${o.total}, but the true state there is ${describe(s)}`
  return null
}

/** Checks one watcher against its job's true history. */
export function check (w: Watcher, truth: TrueState[], faults: Fault[], boundMs: number): Verdict {
  const trueFinal = truth.at(-1)
  if (trueFinal === undefined || !trueFinal.final) {
    return { watcher: w, ok: false, deadline: 0, problem: `harness: job ${w.jobId} has no final state in its true history (${truth.map(describe).join(', ')})` }
  }
  const deadline = deadlineFor(trueFinal.t, faults, boundMs)
  const fail = (problem: string): Verdict => ({ watcher: w, ok: false, deadline, problem, ...(w.finalAt !== null ? { latencyMs: w.finalAt - trueFinal.t } : {}) })
  // Order
  if (VERSIONED.has(w.transport)) {
    let prev: Observation | undefined
    for (const o of w.obs) {
      if (o.entry === undefined) continue
      const at = [...truth].reverse().find(s => compareEntryIds(s.id, o.entry as string) <= 0)
      // Clients order by the whole version (attempt first, lib/wire/version.ts): so does the check.
      if (prev?.entry !== undefined && (compareEntryIds(o.entry, prev.entry) < 0 || (o.attempt !== undefined && prev.attempt !== undefined && o.attempt < prev.attempt))) {
        const truly = at !== undefined ? `; the true state at ${o.entry} is ${describe(at)}` : ''
        return fail(`out of order: received ${render(prev)} then ${render(o)} (version ${o.attempt ?? '?'}.${o.entry} is older than ${prev.attempt ?? '?'}.${prev.entry}${truly})`)
      }
      const wrong = w.transport === 'feed' ? (at !== undefined && o.status !== at.status ? `status ${o.status}, but the true state there is ${describe(at)}` : null) : showsVersioned(o, at)
      if (wrong !== null) return fail(`wrong state at its version: received ${render(o)}: ${wrong}`)
      prev = o
    }
  } else {
    let p = 0
    let prev: Observation | undefined
    for (const o of w.obs) {
      let j = p
      while (j < truth.length && !showsUnversioned(o, truth[j])) j++
      if (j === truth.length) {
        const anywhere = truth.findIndex(s => showsUnversioned(o, s))
        return fail(anywhere < 0
          ? `a state that is not in the true history: received ${render(o)}${prev !== undefined ? ` after ${render(prev)}` : ''}`
          : `out of order: received ${prev !== undefined ? render(prev) : '(nothing)'} then ${render(o)}, which is the older true state ${describe(truth[anywhere])}`)
      }
      p = j
      prev = o
    }
  }
  // The final, in time
  const last = w.obs.at(-1)
  if (w.finalAt === null) return fail(`missing final: the true final is ${describe(trueFinal)}; last received ${last !== undefined ? render(last) : 'nothing'}`)
  const firstFinal = w.obs[w.finalIndex]
  if (firstFinal.status !== trueFinal.status) return fail(`wrong final: received ${render(firstFinal)}; the true final is ${describe(trueFinal)}`)
  if (last !== undefined && last.status !== trueFinal.status) return fail(`something after the final: ${render(last)}`)
  const latencyMs = w.finalAt - trueFinal.t
  if (w.finalAt > deadline) return { watcher: w, ok: false, deadline, latencyMs, problem: `late final: ${latencyMs} ms after the true final ${describe(trueFinal)}, past the bound (deadline ${deadline - trueFinal.t} ms after it, faults included)` }
  return { watcher: w, ok: true, deadline, latencyMs }
}

// ---------------------------------------------------------------------------------------------
// Watcher connections

const backoff = async (attempt: number): Promise<void> => await sleep(Math.min(1_000, 100 * 2 ** Math.min(attempt, 4)))

/** A WebSocket that reconnects (with backoff) until `stop()`, calling `onOpen` after each connect. */
class Reconnecting {
  #stopped = false
  #socket: WebSocket | null = null
  #attempt = 0
  connects = 0
  closes: number[] = []
  onClose: (code: number) => void = () => {}

  constructor (readonly url: () => string, readonly headers: Record<string, string>, readonly onOpen: (ws: WebSocket) => void, readonly onMessage: (m: any) => void, readonly wanted: () => boolean) {
    this.#open()
  }

  #open (): void {
    if (this.#stopped || !this.wanted()) return
    const ws = new WebSocket(this.url(), { headers: this.headers })
    this.#socket = ws
    ws.on('error', () => {})
    ws.on('open', () => { this.#attempt = 0; this.connects++; this.onOpen(ws) })
    ws.on('message', (data) => {
      let m: any = data.toString()
      try { m = JSON.parse(m) } catch {}
      this.onMessage(m)
    })
    ws.on('close', (code) => {
      this.closes.push(code)
      if (this.#stopped) return
      this.onClose(code)
      void backoff(this.#attempt++).then(() => this.#open())
    })
  }

  /** Opens again now if it stopped for want of jobs. */
  poke (): void {
    if (this.#socket === null || this.#socket.readyState === WebSocket.CLOSED) this.#open()
  }

  get open (): boolean {
    return this.#socket?.readyState === WebSocket.OPEN
  }

  send (m: unknown): void {
    if (this.#socket?.readyState === WebSocket.OPEN) this.#socket.send(JSON.stringify(m))
  }

  stop (): void {
    this.#stopped = true
    this.#socket?.terminate()
  }
}

export interface Owner { key: string, name: string }

/**
 * All watchers of a run, by transport and job, with the connections that feed them: per-job
 * sockets, per-owner sockets (jobs, scan, feed), per-job SSE and polling, the browser's client
 * per owner, the webhook receiver.
 */
export class Watchers {
  readonly all: Watcher[] = []
  readonly #byKey = new Map<string, Watcher>()
  readonly #stops: Array<() => void> = []
  readonly #owners = new Map<string, { jobs: Reconnecting, scan: Reconnecting, feed: Reconnecting, ids: string[] }>()
  readonly #base: string
  readonly #ws: string
  #page: Page | null = null

  constructor (base: string) {
    this.#base = base
    this.#ws = base.replace(/^http/, 'ws')
  }

  get (transport: Transport, jobId: string): Watcher | undefined {
    return this.#byKey.get(`${transport} ${jobId}`)
  }

  #add (transport: Transport, jobId: string): Watcher {
    const w = new Watcher(transport, jobId)
    this.all.push(w)
    this.#byKey.set(`${transport} ${jobId}`, w)
    return w
  }

  /** The per-owner connections: `jobs` and the seed 001 dialect, and the feed; before any upload. */
  async openOwner (owner: Owner): Promise<void> {
    const headers = { authorization: `Bearer ${owner.key}` }
    const ids: string[] = []
    const unfinished = (t: Transport): string[] => ids.filter(id => this.get(t, id)?.done === false)
    const jobs = new Reconnecting(() => `${this.#ws}/api/v1/ws/jobs`, headers, () => {
      for (const id of unfinished('jobs')) {
        this.get('jobs', id)?.notes.push(`connection ${jobs.connects}: subscribe sent`)
        jobs.send({ action: 'subscribe', job_id: id })
      }
    }, (m) => {
      if (m?.type === 'job_update') this.get('jobs', m.job_id)?.push(versioned(m.status, m, m))
      else if (m?.type === 'subscribed' || m?.type === 'error') this.get('jobs', m.job_id)?.notes.push(`${m.type}${m.message !== undefined ? ` ${String(m.message)}` : ''}`)
    }, () => true)
    jobs.onClose = (code) => { for (const id of unfinished('jobs')) this.get('jobs', id)?.notes.push(`socket closed ${code}`) }
    const scan = new Reconnecting(() => `${this.#ws}/ws`, headers, () => {
      for (const id of unfinished('scan')) scan.send({ type: 'subscribe', run_uuid: id })
    }, (m) => {
      if (m?.type === 'status_update') this.get('scan', m.run_uuid)?.push(seedObservation(m.data, SCAN_STATUS))
    }, () => unfinished('scan').length > 0)
    let feedOpen!: () => void
    const feedReady = new Promise<void>(resolve => { feedOpen = resolve })
    const feed = new Reconnecting(() => `${this.#ws}/api/v1/ws/jobs`, headers, () => {
      feed.send({ action: 'subscribe_mine' })
      // After a reconnect the feed may have missed changes: read the list, as a client would.
      if (feed.connects > 1) void this.#readList(owner, ids)
      feedOpen()
    }, (m) => {
      if (m?.type === 'my_job' && m.version !== undefined) {
        this.get('feed', m.job_id)?.push({ at: Date.now(), status: m.status, entry: m.version, raw: JSON.stringify(m) })
      } else if (m?.type === 'my_job') {
        this.get('feed', m.job_id)?.push({ at: Date.now(), status: m.status, raw: JSON.stringify(m) })
      } else if (m?.type === 'my_jobs_resync') {
        void this.#readList(owner, ids)
      }
    }, () => true)
    this.#owners.set(owner.key, { jobs, scan, feed, ids })
    this.#stops.push(() => { jobs.stop(); scan.stop(); feed.stop() })
    await feedReady
  }

  /** GET /jobs: the feed's repair after a resync or a reconnect. */
  async #readList (owner: Owner, ids: string[]): Promise<void> {
    try {
      const res = await fetch(`${this.#base}/job-progress/jobs?limit=100`, { headers: { authorization: `Bearer ${owner.key}` } })
      if (res.status !== 200) return
      const body = await res.json() as { jobs: Array<{ job_id: string, status: Status, version?: string }> }
      for (const j of body.jobs) {
        if (!ids.includes(j.job_id)) continue
        const v = parseVersion(j.version)
        this.get('feed', j.job_id)?.push({ at: Date.now(), status: j.status, ...(v !== null ? { entry: `${v.ms}-${v.seq}`, attempt: v.attempt } : {}), raw: `GET /jobs: ${JSON.stringify(j)}` })
      }
    } catch {}
  }

  /** The browser page, with one client per owner, reporting every update through an exposed function. */
  async openBrowser (t: Teardown, owners: Owner[]): Promise<void> {
    const page = await browserPage(t, this.#base)
    this.#page = page
    await page.exposeFunction('jpHistory', (u: any) => {
      this.get('browser', u.jobId)?.push({ ...versioned(u.status, u, u), at: u.at })
    })
    await page.evaluate((keys) => {
      const { JobProgressClient } = (window as any).JP
      const w = window as any
      w.clients = {}
      for (const key of keys) w.clients[key] = new JobProgressClient({ wsPath: '/api/v1/ws/jobs', apiKey: key, backoff: { minMs: 100, maxMs: 1000 } })
      w.watchJob = (key: string, jobId: string) => {
        const watch = w.clients[key].watch('batch', jobId)
        watch.onUpdate((u: any) => { if (u) w.jpHistory({ jobId, status: u.status, processed: u.processed, total: u.total, version: u.version, at: Date.now() }) })
      }
    }, owners.map(o => o.key))
  }

  /** Opens every watcher of a new job. */
  watchJob (owner: Owner, jobId: string, transports: Set<Transport>): void {
    const conns = this.#owners.get(owner.key)
    if (conns === undefined) throw new Error(`owner ${owner.name} has no connections: openOwner first`)
    conns.ids.push(jobId)
    const headers = { authorization: `Bearer ${owner.key}` }
    for (const transport of transports) this.#add(transport, jobId)
    if (transports.has('jobs')) {
      this.get('jobs', jobId)?.notes.push(`connection ${conns.jobs.connects}: subscribe sent${conns.jobs.open ? '' : ' (socket not open: sent on reconnect)'}`)
      conns.jobs.send({ action: 'subscribe', job_id: jobId })
    }
    if (transports.has('scan')) { conns.scan.send({ type: 'subscribe', run_uuid: jobId }); conns.scan.poke() }
    if (transports.has('progress')) {
      const w = this.get('progress', jobId) as Watcher
      const socket = new Reconnecting(() => `${this.#ws}/ws/batch/${jobId}`, headers, () => {}, (m) => {
        if (typeof m?.status === 'string') w.push(seedObservation(m))
      }, () => !w.done)
      this.#stops.push(() => socket.stop())
    }
    if (transports.has('sse')) this.#sse(this.get('sse', jobId) as Watcher, headers)
    if (transports.has('polling')) this.#poll(this.get('polling', jobId) as Watcher, headers)
    if (transports.has('browser')) {
      if (this.#page === null) throw new Error('openBrowser first')
      void this.#page.evaluate(({ key, jobId }) => (window as any).watchJob(key, jobId), { key: owner.key, jobId }).catch(() => {})
    }
  }

  #sse (w: Watcher, headers: Record<string, string>): void {
    const run = { stopped: false }
    let current: SseClient | null = null
    this.#stops.push(() => { run.stopped = true; current?.close() })
    const noTeardown = { teardown: () => {} }
    void (async () => {
      let lastId: string | undefined
      for (let attempt = 0; !run.stopped && !w.done; attempt++) {
        try {
          const client = await openSse(noTeardown, `${this.#base}/batch/${w.jobId}/events`, { ...headers, ...(lastId !== undefined ? { 'last-event-id': lastId } : {}) })
          current = client
          let seen = 0
          const take = (): void => {
            for (; seen < client.events.length; seen++) {
              const e = client.events[seen]
              if (e.id !== undefined && e.id !== '') lastId = e.id
              if (e.event === 'job_update') { w.push(versioned(e.data.status, e.data, e.data)); attempt = 0 }
            }
          }
          client.res.on('data', take)
          await client.ended
          take()
          if (client.status !== 200 && client.status !== 204) w.notes.push(`SSE answered ${client.status}`)
          if (lastId === 'done' || client.status === 204) return
        } catch {}
        if (!run.stopped && !w.done) await backoff(attempt)
      }
    })()
  }

  #poll (w: Watcher, headers: Record<string, string>): void {
    const run = { stopped: false }
    this.#stops.push(() => { run.stopped = true })
    void (async () => {
      while (!run.stopped && !w.done) {
        try {
          const res = await fetch(`${this.#base}/batch/${w.jobId}/status`, { headers, signal: AbortSignal.timeout(5_000) })
          if (res.status === 200) w.push(seedObservation(await res.json()))
          else await res.body?.cancel()
        } catch {}
        if (!w.done) await sleep(300)
      }
    })()
  }

  /** A webhook call: every delivery is a watcher's message. */
  webhook (body: string): void {
    try {
      const m = JSON.parse(body)
      this.get('webhook', m.job_id)?.push(versioned(m.status, m, m))
    } catch {}
  }

  stop (): void {
    for (const stop of this.#stops.splice(0)) stop()
  }
}

// ---------------------------------------------------------------------------------------------
// The deployment: a private redis-server, 2 API instances of the example, nginx, the receiver

export class Deployment {
  redis!: RedisServer
  uploadDir!: string
  apis: Api[] = []
  nginx!: { url: string }
  receiver!: Receiver
  admin!: Redis
  #env: Record<string, string> = {}
  /** Every API process ever started, so teardown stops them even when a start failed midway. */
  readonly #procs: Proc[] = []

  static async start (t: Teardown, opts: { apis?: number, owners: Owner[], maxConnectionsPerOwner?: number }): Promise<Deployment> {
    const d = new Deployment()
    d.redis = await RedisServer.start()
    d.uploadDir = await tempDir(t, 'jp-history-uploads-')
    const secret = newSecret()
    d.receiver = await Receiver.start(t, [secret])
    d.admin = d.redis.client()
    t.teardown(async () => {
      d.admin.disconnect()
      await Promise.all(d.#procs.map(async p => await p.stop('SIGKILL')))
      await d.redis.stop()
    })
    d.#env = {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '',
      REDIS_URL: d.redis.url,
      SESSION_SECRET,
      UPLOAD_DIR: d.uploadDir,
      API_KEYS: opts.owners.map(o => `${o.key}:${o.name}`).join(','),
      // HISTORY_LOG_LEVEL=warn shows the instances' warnings in RunResult.output, to diagnose a failure.
      LOG_LEVEL: process.env.HISTORY_LOG_LEVEL ?? 'error',
      WEBHOOK_URL: `${d.receiver.url}/hook`,
      WEBHOOK_SECRET: secret,
      MAX_CONNECTIONS_PER_OWNER: String(opts.maxConnectionsPerOwner ?? 50)
    }
    const ports = await Promise.all(Array.from({ length: opts.apis ?? 2 }, async () => await freePort()))
    d.apis = await Promise.all(ports.map(async (port, i) => await d.startApi(port, `api-${i}`)))
    d.nginx = await startNginx(t, d.apis)
    return d
  }

  /** One API instance on `port`, used once its readiness route answers 200, as a load balancer would. */
  async startApi (port: number, name: string): Promise<Api> {
    const proc = new Proc(name, process.execPath, [...LOAD_TS, 'test/fixtures/history-api.ts'], { ...this.#env, PORT: String(port) })
    this.#procs.push(proc)
    const api: Api = { proc, port, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}`, id: '' }
    const deadline = Date.now() + 30_000
    let answer = 'no answer'
    for (;;) {
      if (!proc.running) throw new Error(`${name} exited before it was ready:\n${proc.output}`)
      try {
        const res = await fetch(`${api.url}/job-progress/ready`, { signal: AbortSignal.timeout(1_000) })
        if (res.status === 200) {
          api.id = (await res.json() as { instance: string }).instance
          return api
        }
        answer = `${res.status} ${await res.text()}`
      } catch {}
      if (Date.now() > deadline) throw new Error(`${name} not ready within 30 s (/ready answered ${answer}):\n${proc.output}`)
      await sleep(50)
    }
  }

  /** The tail of every API process's output, oldest process first. */
  output (): string[] {
    return this.#procs.map(p => `${p.name}:\n${p.output}`)
  }

  /** The local ports of this process's connections to Redis: the test's own, which faults spare. */
  ownPorts (): Set<number> {
    const ports = new Set<number>()
    for (const h of (process as any)._getActiveHandles() as any[]) {
      if (h?.remotePort === this.redis.port && typeof h.localPort === 'number') ports.add(h.localPort)
    }
    return ports
  }

  /** CLIENT KILL of every command connection (not pubsub) that is not this process's own. */
  async killCommandConnections (): Promise<number> {
    const own = this.ownPorts()
    const list = (await this.admin.call('CLIENT', 'LIST', 'TYPE', 'normal') as string).trim().split('\n')
    let killed = 0
    for (const line of list) {
      const id = /\bid=(\d+)/.exec(line)?.[1]
      const port = Number(/\baddr=[^ ]*:(\d+)/.exec(line)?.[1])
      if (id === undefined || own.has(port)) continue
      try { killed += Number(await this.admin.call('CLIENT', 'KILL', 'ID', id)) } catch {}
    }
    return killed
  }

  async killSubscriberConnections (): Promise<number> {
    return Number(await this.admin.call('CLIENT', 'KILL', 'TYPE', 'pubsub'))
  }
}

// ---------------------------------------------------------------------------------------------
// A run

export type FaultName = 'none' | 'sigkill-instance' | 'kill-subscribers' | 'kill-commands' | 'sigstop-redis' | 'restart-redis' | 'trim-stream'
export const FAULTS: FaultName[] = ['sigkill-instance', 'kill-subscribers', 'kill-commands', 'sigstop-redis', 'restart-redis', 'trim-stream']

export interface RunOptions {
  /** Jobs per fault round (the first round runs with no fault). */
  jobsPerRound: number
  faults: FaultName[]
  owners: number
  seed: number
  stepMs: number
  /** Which transports watch each job; `sample` transports watch every `sampleEvery`th job only. */
  transports: Transport[]
  sample?: Transport[]
  sampleEvery?: number
  /** The convergence bound (ms): docs/architecture.md states none for most faults, so 15 s. */
  boundMs: number
  concurrency?: number
  log?: (line: string) => void
}

/** The small run of `npm test`: 2 jobs per round (14 in all), every transport on every job. */
export const SMALL_RUN: RunOptions = {
  jobsPerRound: 2,
  faults: FAULTS,
  owners: 2,
  seed: 1,
  stepMs: 100,
  transports: TRANSPORTS,
  boundMs: 15_000
}

export interface RunResult {
  verdicts: Verdict[]
  faults: Fault[]
  /** Job id → the fault of its round and its plan. */
  jobs: Map<string, { fault: FaultName, plan: Plan }>
  truth: Map<string, TrueState[]>
  watchers: number
  durationMs: number
  /** The tail of each API process's output (its logs at HISTORY_LOG_LEVEL, else errors only). */
  output: string[]
}

/**
 * Runs rounds of random jobs on a fresh deployment: each round uploads its jobs, waits until they
 * run, injects its fault, and the next round starts once the fault is over. Then waits until every
 * watcher has its final or its deadline passed, and checks every watcher.
 */
export async function runHistory (t: Teardown, o: RunOptions): Promise<RunResult> {
  const started = Date.now()
  const log = o.log ?? (() => {})
  const owners: Owner[] = Array.from({ length: o.owners }, (_, i) => ({ key: `history-key-${i}`, name: `owner-${i}` }))
  const d = await Deployment.start(t, { owners })
  const recorder = new StreamRecorder(d.redis)
  const watchers = new Watchers(d.nginx.url)
  t.teardown(async () => {
    watchers.stop()
    await recorder.stop()
  })
  d.receiver.answer = (call) => { watchers.webhook(call.body); return { status: 200 } }
  const jobOwner = new Map<string, Owner>()
  const cancelling: Array<Promise<void>> = []
  const onCancelPoint = async (jobId: string): Promise<void> => {
    const owner = jobOwner.get(jobId) as Owner
    cancelling.push((async () => {
      for (let attempt = 0; attempt < 50; attempt++) {
        try {
          const res = await fetch(`${d.nginx.url}/batch/${jobId}/cancel`, { method: 'POST', headers: { authorization: `Bearer ${owner.key}` }, signal: AbortSignal.timeout(5_000) })
          await res.body?.cancel()
          if (res.status < 500) return
        } catch {}
        await backoff(attempt)
      }
      log(`could not cancel ${jobId}`)
    })())
    await cancelling.at(-1)
  }
  planWorker(t, d.redis, d.uploadDir, onCancelPoint, o.concurrency ?? 50)
  await Promise.all(owners.map(async owner => await watchers.openOwner(owner)))
  const wantsBrowser = o.transports.includes('browser') || (o.sample ?? []).includes('browser')
  if (wantsBrowser) await watchers.openBrowser(t, owners)
  log(`deployment up in ${Date.now() - started} ms: ${d.apis.length} instances behind nginx, ${owners.length} owners`)

  const random = rng(o.seed)
  const jobs = new Map<string, { fault: FaultName, plan: Plan }>()
  const faults: Fault[] = []
  let n = 0
  const rounds: FaultName[] = ['none', ...o.faults]
  for (const fault of rounds) {
    const ids: string[] = []
    await Promise.all(Array.from({ length: o.jobsPerRound }, async () => {
      const i = n++
      const owner = owners[i % owners.length]
      const plan = randomPlan(random, o.stepMs)
      const up = await uploadWithRetry(`${d.nginx.url}/batch/upload`, JSON.stringify(plan), owner)
      const jobId = up as string
      jobOwner.set(jobId, owner)
      jobs.set(jobId, { fault, plan })
      ids.push(jobId)
      const transports = new Set(o.transports)
      if (i % (o.sampleEvery ?? 1) === 0) for (const s of o.sample ?? []) transports.add(s)
      watchers.watchJob(owner, jobId, transports)
    }))
    // The fault strikes while the round's jobs run: once each has reported at least twice.
    await recorder.until(`the jobs of round "${fault}" run`, () => ids.every(id => (recorder.byJob.get(id) ?? []).filter(e => e.fields.event === 'progress').length >= 2), 60_000)
    if (fault !== 'none') {
      const f = await inject(d, recorder, fault, log)
      faults.push(f)
    }
  }
  const ids = [...jobs.keys()]
  await recorder.until('every job has a final state', () => ids.every(id => recorder.truth(id).at(-1)?.final === true), 120_000)
  await Promise.all(cancelling)
  log(`every job ended (${Date.now() - started} ms); waiting for the watchers`)
  // Each watcher until its final or its deadline.
  await Promise.all(watchers.all.map(async w => {
    const truth = recorder.truth(w.jobId)
    const deadline = deadlineFor((truth.at(-1) as TrueState).t, faults, o.boundMs)
    let timer: NodeJS.Timeout | undefined
    await Promise.race([w.final, new Promise<void>(resolve => { timer = setTimeout(resolve, Math.max(0, deadline - Date.now()) + 200) })])
    clearTimeout(timer)
  }))
  // A last moment for messages after a final (nothing may follow one): what is in flight lands.
  await sleep(300)
  watchers.stop()
  const missing = await recorder.missing(d.admin)
  if (missing !== null && missing !== 0) throw new Error(`harness: the stream recorder missed ${missing} entries; the true history is incomplete`)
  const truth = new Map(ids.map(id => [id, recorder.truth(id)]))
  const verdicts = watchers.all.map(w => check(w, truth.get(w.jobId) as TrueState[], faults, o.boundMs))
  return { verdicts, faults, jobs, truth, watchers: watchers.all.length, durationMs: Date.now() - started, output: d.output() }
}

async function uploadWithRetry (url: string, content: string, owner: Owner): Promise<string> {
  for (let attempt = 0; ; attempt++) {
    try {
      const up = await upload(url, content, { headers: { authorization: `Bearer ${owner.key}` }, filename: 'plan.json', type: 'application/json' })
      if (up.status === 202) return up.body.job_id
      if (attempt >= 20) throw new Error(`upload answered ${up.status}: ${JSON.stringify(up.body)}`)
    } catch (err) {
      if (attempt >= 20) throw err
    }
    await backoff(attempt)
  }
}

/** Injects one fault; resolves once it is over (the instance or Redis back), with its window. */
export async function inject (d: Deployment, recorder: StreamRecorder, fault: FaultName, log: (line: string) => void): Promise<Fault> {
  const start = Date.now()
  let what = ''
  switch (fault) {
    case 'sigkill-instance': {
      const victim = d.apis[0]
      await victim.proc.stop('SIGKILL')
      d.apis[0] = await d.startApi(victim.port, victim.proc.name)
      what = `${victim.proc.name} killed and started again`
      break
    }
    case 'kill-subscribers':
      what = `${await d.killSubscriberConnections()} subscriber connections killed`
      break
    case 'kill-commands':
      what = `${await d.killCommandConnections()} command connections killed`
      break
    case 'sigstop-redis':
      d.redis.signal('SIGSTOP')
      // The fault is a 5 s pause of Redis: the time is the fault itself.
      await sleep(5_000)
      d.redis.signal('SIGCONT')
      what = 'Redis paused 5 s'
      break
    case 'restart-redis':
      await d.redis.restart()
      what = 'Redis restarted from its append-only file'
      break
    case 'trim-stream':
      what = `${await recorder.trim(d.admin)} stream entries trimmed`
      break
    default:
      break
  }
  const end = Date.now()
  log(`fault ${fault}: ${what} (${end - start} ms)`)
  return { name: fault, start, end }
}

// ---------------------------------------------------------------------------------------------
// Reports

const quantile = (xs: number[], q: number): number => {
  if (xs.length === 0) return NaN
  const s = [...xs].sort((a, b) => a - b)
  return s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]
}

/** The failures, one paragraph each: job, watcher, what went wrong, the job's plan. */
export function failureReport (r: RunResult, limit = 40): string {
  const bad = r.verdicts.filter(v => !v.ok)
  const lines = bad.slice(0, limit).map(v => {
    const job = r.jobs.get(v.watcher.jobId)
    return `- ${v.watcher.name} (round "${job?.fault ?? '?'}"; plan: ${job !== undefined ? describePlan(job.plan) : '?'}): ${v.problem ?? ''}${v.watcher.notes.length > 0 ? ` [notes: ${v.watcher.notes.slice(-4).join('; ')}]` : ''}`
  })
  if (bad.length > limit) lines.push(`… and ${bad.length - limit} more`)
  return lines.join('\n')
}

/** Failures counted by transport × fault round. */
export function failureMatrix (r: RunResult): string {
  const rounds = ['none', ...r.faults.map(f => f.name)]
  const rows = TRANSPORTS.map(tr => {
    const cells = rounds.map(f => {
      const vs = r.verdicts.filter(v => v.watcher.transport === tr && r.jobs.get(v.watcher.jobId)?.fault === f)
      if (vs.length === 0) return '-'
      const bad = vs.filter(v => !v.ok).length
      return bad === 0 ? `ok ${vs.length}` : `${bad}/${vs.length} FAIL`
    })
    return `| ${tr} | ${cells.join(' | ')} |`
  })
  return [`| transport | ${rounds.join(' | ')} |`, `| --- | ${rounds.map(() => '---').join(' | ')} |`, ...rows].join('\n')
}

/** Time from the true final to each watcher's final, p50 / p99 / max, per fault round. */
export function latencyTable (r: RunResult): string {
  const rounds = ['none', ...r.faults.map(f => f.name)]
  const row = (label: string, vs: Verdict[]): string => {
    const xs = vs.filter(v => v.latencyMs !== undefined).map(v => v.latencyMs as number)
    const missing = vs.filter(v => v.watcher.finalAt === null).length
    const f = (x: number): string => Number.isNaN(x) ? '-' : `${(x / 1000).toFixed(2)} s`
    return `| ${label} | ${vs.length} | ${f(quantile(xs, 0.5))} | ${f(quantile(xs, 0.99))} | ${f(xs.length === 0 ? NaN : Math.max(...xs))} | ${missing} | ${vs.filter(v => !v.ok).length} |`
  }
  return [
    '| fault | watchers | p50 | p99 | max | no final | failed checks |',
    '| --- | --- | --- | --- | --- | --- | --- |',
    ...rounds.map(f => row(f, r.verdicts.filter(v => r.jobs.get(v.watcher.jobId)?.fault === f)))
  ].join('\n')
}
