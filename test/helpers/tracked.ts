import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { onExit } from 'signal-exit'

/**
 * Everything a test starts outside its own process (servers, browsers, temp directories) is
 * recorded twice: in memory, so this process stops it when it exits for any reason (a failed
 * assertion, a timeout, SIGINT, SIGTERM), and as a file in the run's registry, so the check at the
 * end of the run (test/global/after.ts) finds what a process killed outright could not clean.
 */
export const REGISTRY = process.env.JP_TEST_REGISTRY ?? resolve(__dirname, '..', '..', '.test-registry')

interface ProcessRecord { kind: 'process', pid: number, command: string, owner: number, ownerStarted?: string | null, started: string | null }
interface DirRecord { kind: 'dir', path: string, owner: number, ownerStarted?: string | null }
export type LeakRecord = ProcessRecord | DirRecord

const children = new Map<number, ChildProcess>()
const dirs = new Set<string>()

function recordFile (key: string): string {
  return join(REGISTRY, createHash('sha1').update(key).digest('hex').slice(0, 16))
}

function record (key: string, value: LeakRecord): void {
  mkdirSync(REGISTRY, { recursive: true })
  writeFileSync(recordFile(key), JSON.stringify(value))
}

function forget (key: string): void {
  try { unlinkSync(recordFile(key)) } catch {}
}

/** Kills a tracked child and everything it started (it leads its own process group). */
function killGroup (pid: number, signal: NodeJS.Signals = 'SIGKILL'): void {
  try { process.kill(-pid, signal) } catch {}
  try { process.kill(pid, signal) } catch {}
}

onExit(() => {
  for (const [pid] of children) {
    killGroup(pid)
    forget(`process:${pid}`)
  }
  for (const pid of adopted) {
    killGroup(pid)
    forget(`process:${pid}`)
  }
  for (const dir of dirs) {
    try { rmSync(dir, { recursive: true, force: true }) } catch {}
    forget(`dir:${dir}`)
  }
}, { alwaysLast: true })

/**
 * `spawn`, recorded until the child exits. The child leads its own process group so that stopping
 * it also stops its own children (nginx's workers); `child.kill()` still signals the child only.
 */
export function spawnTracked (command: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
  const child = spawn(command, args, { ...opts, detached: true })
  // A missing binary is reported by the caller through the exit; never as an uncaught crash.
  child.on('error', () => {})
  const pid = child.pid
  if (pid === undefined) return child
  children.set(pid, child)
  record(`process:${pid}`, { kind: 'process', pid, command: [command, ...args].join(' ').slice(0, 300), owner: process.pid, ownerStarted: OWNER_STARTED, started: startTime(pid) })
  child.once('exit', () => {
    children.delete(pid)
    forget(`process:${pid}`)
  })
  return child
}

const adopted = new Set<number>()

/** This process's direct children, by pid (from /proc). */
export function childPids (): Set<number> {
  const pids = new Set<number>()
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    try {
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8')
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === process.pid) pids.add(Number(name))
    } catch {}
  }
  return pids
}

/**
 * Records a process something else started for a test (a browser a library launched), so the
 * exit handler and the end-of-run check stop it like a spawnTracked one. Returns the release.
 */
export function adoptProcess (pid: number, command: string): () => void {
  adopted.add(pid)
  record(`process:${pid}`, { kind: 'process', pid, command: command.slice(0, 300), owner: process.pid, ownerStarted: OWNER_STARTED, started: startTime(pid) })
  return () => {
    adopted.delete(pid)
    forget(`process:${pid}`)
  }
}

/** A new temp directory under the OS temp dir, recorded until `removeTracked`. */
export function mkdtempTracked (prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  dirs.add(dir)
  record(`dir:${dir}`, { kind: 'dir', path: dir, owner: process.pid, ownerStarted: OWNER_STARTED })
  return dir
}

export function removeTracked (dir: string): void {
  rmSync(dir, { recursive: true, force: true })
  dirs.delete(dir)
  forget(`dir:${dir}`)
}

/** The records left in the registry (each one something a test started and did not stop). */
export function leftovers (): LeakRecord[] {
  let names: string[]
  try { names = readdirSync(REGISTRY) } catch { return [] }
  const out: LeakRecord[] = []
  for (const name of names) {
    try { out.push(JSON.parse(readFileSync(join(REGISTRY, name), 'utf8'))) } catch {}
  }
  return out
}

/** A process's start time (clock ticks since boot), which tells a reused pid from the original. */
function startTime (pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    // A zombie has exited: only its parent's wait is missing.
    if (fields[0] === 'Z') return null
    return fields[19]
  } catch {
    return null
  }
}

const OWNER_STARTED = startTime(process.pid)

/**
 * Whether the test process that recorded an item still runs. Two runs in one worktree share the
 * registry: what a live test process of another run holds is that run's, not a leak, and killing
 * it (its Redis, mid-test) made the other run's tests fail for no fault of theirs.
 */
function ownerAlive (rec: LeakRecord): boolean {
  if (rec.owner === process.pid) return false
  const started = startTime(rec.owner)
  return started !== null && (rec.ownerStarted === undefined || rec.ownerStarted === null || started === rec.ownerStarted)
}

/** Whether the recorded process still runs (the same pid with the same start time). */
export function stillRunning (rec: ProcessRecord): boolean {
  const started = startTime(rec.pid)
  return started !== null && (rec.started === null || started === rec.started)
}

/**
 * Stops and removes everything in the registry whose test process has ended (a live one belongs
 * to a run going on beside this one); returns a line per item found. Used by the
 * global setup (leftovers of an earlier run) and the end-of-run check.
 */
export function sweep (): string[] {
  const found: string[] = []
  for (const rec of leftovers()) {
    if (ownerAlive(rec)) continue
    if (rec.kind === 'process') {
      if (stillRunning(rec)) {
        killGroup(rec.pid)
        found.push(`process ${rec.pid} still running: ${rec.command}`)
      }
      forget(`process:${rec.pid}`)
    } else {
      let exists = true
      try { readdirSync(rec.path) } catch { exists = false }
      if (exists) {
        rmSync(rec.path, { recursive: true, force: true })
        found.push(`temp directory left: ${rec.path}`)
      }
      forget(`dir:${rec.path}`)
    }
  }
  return found
}
