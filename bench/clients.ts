import { readFileSync } from 'node:fs'
import { io, type Socket as IoSocket } from 'socket.io-client'
import WebSocket from 'ws'
import { cpuSeconds, nowMs, serve } from './lib/ipc'

/**
 * A client process: opens many sockets of one system, records when each progress message
 * arrives by its sequence number (`processed`), and joins those times with the driver's send
 * table when asked. Several of these run side by side so that the clients are not one core.
 */
type System = 'plugin' | 'candidate' | 'floor' | 'sio'

interface Sub { url: string, jobIndex: number, jobId: string, instance?: number }

class Tracked {
  recv = new Float64Array(256).fill(NaN)
  last = 0
  duplicates = 0
  outOfOrder = 0
  finals = 0
  closeCode: number | null = null
  close: () => void = () => {}
  readonly jobIndex: number
  readonly instance: number
  constructor (jobIndex: number, instance = 0) {
    this.jobIndex = jobIndex
    this.instance = instance
  }

  record (seq: number, at: number): void {
    if (seq >= this.recv.length) {
      const next = new Float64Array(Math.max(this.recv.length * 2, seq + 1)).fill(NaN)
      next.set(this.recv)
      this.recv = next
    }
    if (!Number.isNaN(this.recv[seq])) this.duplicates++
    if (seq < this.last) this.outOfOrder++
    else this.last = seq
    this.recv[seq] = at
  }
}

/** Sockets per session ("set"): several sessions can be up at once. */
const sets = new Map<string, Tracked[]>()
/** Progress messages received by this process, to see when traffic has stopped. */
let receivedTotal = 0

function onProgress (t: Tracked, m: { status?: string, processed?: number } | null): void {
  if (m === null || typeof m.processed !== 'number') return
  if (m.status !== undefined && m.status !== 'processing') {
    t.finals++
    return
  }
  if (m.processed >= 1) {
    receivedTotal++
    t.record(m.processed, nowMs())
  }
}

async function openOne (system: System, sub: Sub, owner: string): Promise<Tracked> {
  const t = new Tracked(sub.jobIndex, sub.instance)
  return await new Promise<Tracked>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`socket to ${sub.url} not ready in 30 s`)), 30_000)
    let ready = false
    const isReady = (): void => {
      if (ready) return
      ready = true
      clearTimeout(timer)
      resolve(t)
    }
    if (system === 'sio') {
      const socket: IoSocket = io(sub.url, { transports: ['websocket'], query: { jobId: sub.jobId }, forceNew: true, reconnection: false, timeout: 30_000 })
      socket.on('ready', isReady)
      socket.on('progress', (m) => onProgress(t, m))
      socket.on('connect_error', (err) => { clearTimeout(timer); reject(err) })
      socket.on('disconnect', () => { t.closeCode ??= 0 })
      t.close = () => socket.disconnect()
      return
    }
    const ws = new WebSocket(sub.url, { headers: { 'x-owner': owner }, perMessageDeflate: false })
    ws.on('message', (data) => {
      let m: any = null
      try { m = JSON.parse(data.toString()) } catch {}
      // The plugin's first message is the job's snapshot; the floor's is a ready mark.
      if (!ready) isReady()
      onProgress(t, m)
    })
    ws.on('error', (err) => { if (!ready) { clearTimeout(timer); reject(err) } })
    ws.on('close', (code) => { t.closeCode = code })
    t.close = () => ws.terminate()
  })
}

/** Opens every socket, at most `parallel` handshakes at a time, and waits until each is ready. */
async function open (args: { set: string, system: System, subs: Sub[], owner: string, parallel?: number }): Promise<{ opened: number, ms: number }> {
  const start = Date.now()
  const queue = [...args.subs]
  const opened: Tracked[] = []
  const parallel = args.parallel ?? 64
  await Promise.all(Array.from({ length: Math.min(parallel, queue.length) }, async () => {
    for (let sub = queue.shift(); sub !== undefined; sub = queue.shift()) opened.push(await openOne(args.system, sub, args.owner))
  }))
  sets.set(args.set, [...(sets.get(args.set) ?? []), ...opened])
  return { opened: opened.length, ms: Date.now() - start }
}

/**
 * Waits until every socket saw its job's last sequence number, or nothing arrived for
 * `quietMs` (what is missing then was dropped, not late), or `waitMs` passed; then joins receive
 * times with the driver's send table for the sequence numbers of this run.
 */
async function collect (args: { set: string, file: string, cap: number, from: number[], to: number[], waitMs: number, quietMs: number }): Promise<unknown> {
  const sockets = sets.get(args.set) ?? []
  const deadline = Date.now() + args.waitMs
  let seen = receivedTotal
  let quietSince = Date.now()
  while (Date.now() < deadline && sockets.some(t => t.last < args.to[t.jobIndex])) {
    await new Promise(resolve => setTimeout(resolve, 20))
    if (receivedTotal !== seen) {
      seen = receivedTotal
      quietSince = Date.now()
    } else if (Date.now() - quietSince >= args.quietMs) {
      break
    }
  }
  const buf = readFileSync(args.file)
  const table = new Float64Array(buf.buffer, buf.byteOffset, buf.byteLength / 8)
  const latencies: number[] = []
  // The slowest messages, with when they arrived and through which server (to find stalls).
  const slow: Array<{ at: number, ms: number, instance: number, jobIndex: number }> = []
  let expected = 0
  let received = 0
  let socketsShort = 0
  let worstRatio = 1
  let duplicates = 0
  let outOfOrder = 0
  let minReceived = Infinity
  let maxReceived = 0
  let maxExpected = 0
  for (const t of sockets) {
    let e = 0
    let r = 0
    const base = t.jobIndex * args.cap
    for (let seq = args.from[t.jobIndex]; seq <= args.to[t.jobIndex]; seq++) {
      const sentAt = table[base + seq]
      if (Number.isNaN(sentAt)) continue
      e++
      const at = seq < t.recv.length ? t.recv[seq] : NaN
      if (Number.isNaN(at)) continue
      r++
      latencies.push(at - sentAt)
      if (at - sentAt > 10 && slow.length < 500) slow.push({ at, ms: at - sentAt, instance: t.instance, jobIndex: t.jobIndex })
    }
    expected += e
    received += r
    minReceived = Math.min(minReceived, r)
    maxReceived = Math.max(maxReceived, r)
    maxExpected = Math.max(maxExpected, e)
    if (r < e) socketsShort++
    if (e > 0) worstRatio = Math.min(worstRatio, r / e)
    duplicates += t.duplicates
    outOfOrder += t.outOfOrder
  }
  return { slow, latencies: Float64Array.from(latencies), sockets: sockets.length, expected, received, socketsShort, worstRatio, duplicates, outOfOrder, minReceived, maxReceived, maxExpected }
}

/** Closes every socket (or, with `waitFinal`, first waits until servers closed them after the final message). */
async function closeAll (args: { set: string, waitFinalMs?: number }): Promise<{ finals: number, closedByServer: number, closeCodes: Record<string, number> }> {
  const sockets = sets.get(args.set) ?? []
  if (args.waitFinalMs !== undefined) {
    const deadline = Date.now() + args.waitFinalMs
    while (Date.now() < deadline && sockets.some(t => t.closeCode === null)) await new Promise(resolve => setTimeout(resolve, 20))
  }
  const finals = sockets.reduce((n, t) => n + t.finals, 0)
  const closedByServer = sockets.filter(t => t.closeCode === 1000).length
  const closeCodes: Record<string, number> = {}
  for (const t of sockets) closeCodes[String(t.closeCode ?? 'open')] = (closeCodes[String(t.closeCode ?? 'open')] ?? 0) + 1
  for (const t of sockets) t.close()
  sets.delete(args.set)
  return { finals, closedByServer, closeCodes }
}

serve({
  open,
  collect,
  closeAll,
  cpu: () => cpuSeconds(),
  exit: () => { setTimeout(() => process.exit(0), 20) }
})
