import { Emitter } from '@socket.io/redis-emitter'
import { Queue, Worker, type Job } from 'bullmq'
import { Redis } from 'ioredis'
import { randomUUID } from 'node:crypto'
import { writeFileSync } from 'node:fs'
import { cpuSeconds, nowMs, serve } from './lib/ipc'

/**
 * The progress driver: holds J jobs active in a real BullMQ worker and calls
 * job.updateProgress({ processed, total, sentAt }) on each at R updates/s. `processed` is the
 * update's sequence number within its job, and the driver records when each (job, seq) was
 * sent in a table of float64 wall-clock times that it writes to a file after each run; the
 * clients join their receive times with it. The sequence number is the only thing a message
 * has to carry, so every system is measured the same way, whatever its wire format.
 */
const TOTAL = 1_000_000_000

interface Active {
  job: Job
  seq: number
  release: () => void
}

/** One session's jobs: several sessions can be up at once, so that peers take turns. */
class JobSet {
  queue: Queue | null = null
  worker: Worker | null = null
  emitterRedis: Redis | null = null
  emitter: Emitter | null = null
  jobIds: string[] = []
  active: Active[] = []
  cap = 0
  sent = new Float64Array(0)
  errors = 0

  ensureCap (seq: number): void {
    if (seq < this.cap) return
    const next = Math.max(1024, this.cap * 2, seq + 1)
    const table = new Float64Array(this.jobIds.length * next).fill(NaN)
    for (let j = 0; j < this.jobIds.length; j++) table.set(this.sent.subarray(j * this.cap, (j + 1) * this.cap), j * next)
    this.sent = table
    this.cap = next
  }
}

const sets = new Map<string, JobSet>()
let runNo = 0

function connectionOf (url: string): { host: string, port: number, maxRetriesPerRequest: null } {
  const u = new URL(url)
  return { host: u.hostname, port: Number(u.port), maxRetriesPerRequest: null }
}

function setOf (name: string): JobSet {
  const set = sets.get(name)
  if (set === undefined) throw new Error(`no job set ${name}`)
  return set
}

async function init (args: { set: string, redisUrl: string, queue: string, jobs: number, owner: string, activate: boolean, emitter: boolean }): Promise<{ jobIds: string[] }> {
  const set = new JobSet()
  sets.set(args.set, set)
  const connection = connectionOf(args.redisUrl)
  set.queue = new Queue(args.queue, { connection })
  set.jobIds = Array.from({ length: args.jobs }, () => randomUUID())
  await set.queue.addBulk(set.jobIds.map(jobId => ({ name: 'bench', data: { owner: args.owner }, opts: { jobId, removeOnComplete: true } })))
  set.ensureCap(1)
  if (args.emitter) {
    set.emitterRedis = new Redis(args.redisUrl)
    set.emitterRedis.on('error', () => {})
    set.emitter = new Emitter(set.emitterRedis)
  }
  if (!args.activate) return { jobIds: set.jobIds }
  const index = new Map(set.jobIds.map((id, i) => [id, i]))
  let onAll: () => void = () => {}
  const all = new Promise<void>(resolve => { onAll = resolve })
  let count = 0
  // Long locks and a rare stalled check: their commands would only add noise to Redis counts.
  set.worker = new Worker(args.queue, async (job) => {
    await new Promise<void>(resolve => {
      set.active[index.get(job.id as string) as number] = { job, seq: 0, release: resolve }
      if (++count === set.jobIds.length) onAll()
    })
    return { ok: true }
  }, { connection, concurrency: args.jobs, lockDuration: 600_000, stalledInterval: 600_000 })
  set.worker.on('error', () => {})
  await all
  return { jobIds: set.jobIds }
}

async function run (args: { set: string, rate: number, durationMs: number, dir: string }): Promise<unknown> {
  const set = setOf(args.set)
  const { active, jobIds, emitter } = set
  const J = active.length
  const from = active.map(a => a.seq + 1)
  const gap = 1000 / (args.rate * J)
  const t0 = nowMs() + 5
  const end = t0 + args.durationMs
  let g = 0
  let outstanding = 0
  let onIdle: (() => void) | null = null
  const cpu0 = cpuSeconds()
  // Update g is due at t0 + g * gap: job g % J, the jobs staggered evenly over one period.
  for (;;) {
    const now = nowMs()
    while (t0 + g * gap <= now && t0 + g * gap < end) {
      const j = g % J
      const a = active[j]
      const seq = ++a.seq
      set.ensureCap(seq)
      const sentAt = nowMs()
      set.sent[j * set.cap + seq] = sentAt
      outstanding++
      a.job.updateProgress({ processed: seq, total: TOTAL, sentAt }).catch(() => { set.errors++ }).finally(() => {
        if (--outstanding === 0 && onIdle !== null) onIdle()
      })
      // Emitted in the same tick, not after updateProgress resolves: the most favourable timing
      // for the Socket.IO peer.
      emitter?.to(`job:${jobIds[j]}`).emit('progress', { job_id: jobIds[j], status: 'processing', progress: 0, processed: seq, total: TOTAL, eta_seconds: null })
      g++
    }
    if (t0 + g * gap >= end) break
    const wait = t0 + g * gap - nowMs()
    await new Promise(resolve => setTimeout(resolve, Math.max(0, wait)))
  }
  const lateMs = nowMs() - end
  if (outstanding > 0) await new Promise<void>(resolve => { onIdle = resolve })
  const file = `${args.dir}/sent-${process.pid}-${runNo++}.bin`
  writeFileSync(file, new Uint8Array(set.sent.buffer, set.sent.byteOffset, J * set.cap * 8))
  return { from, to: active.map(a => a.seq), sent: g, errors: set.errors, file, cap: set.cap, durationMs: args.durationMs, lateMs, cpu: cpuSeconds() - cpu0 }
}

async function finish (args: { set: string }): Promise<void> {
  const set = sets.get(args.set)
  if (set === undefined) return
  sets.delete(args.set)
  for (const a of set.active) a?.release()
  // No obliterate here: it would delete the event stream before the plugin's bridge read the
  // `completed` events. The runner flushes Redis once every server of the session has stopped.
  await set.worker?.close()
  await set.queue?.close()
  set.emitterRedis?.disconnect()
}

serve({
  init,
  run,
  finish,
  cpu: () => cpuSeconds(),
  exit: async () => {
    for (const set of [...sets.keys()]) await finish({ set }).catch(() => {})
    setTimeout(() => process.exit(0), 20)
  }
})
