import { readdirSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'

/**
 * Summarises V8 CPU profiles (`.cpuprofile`, from `npm run bench -- --profile` or
 * `node --cpu-prof`): self time per function with file:line, the share spent under each file
 * of lib/, and for the heaviest lib/ frames the inclusive time.
 *
 *   npx tsx bench/profile.ts bench/results/fanout-plugin-2-0-R10.cpuprofile [more files] [--top=30]
 *   ... --stalls=10   stretches of ≥ 10 ms in which the event loop never idled, and what ran
 */
interface Node { id: number, callFrame: { functionName: string, url: string, lineNumber: number, columnNumber: number }, hitCount?: number, children?: number[] }
interface Profile { nodes: Node[], samples: number[], timeDeltas: number[], startTime: number, endTime: number }

const args = process.argv.slice(2)
const top = Number(args.find(a => a.startsWith('--top='))?.slice(6) ?? 25)
const files = args.filter(a => !a.startsWith('--'))
// --stack=writev: the heaviest call paths (up to 8 frames) ending in functions of that name.
const stackOf = args.find(a => a.startsWith('--stack='))?.slice(8)
const stacks = new Map<string, number>()
// --under=#read: self time of the functions running below any frame of that name.
const underOf = args.find(a => a.startsWith('--under='))?.slice(8)
const under = new Map<string, number>()
const root = process.cwd()
// --stalls=10: stretches of at least 10 ms without an idle sample (the event loop never waited),
// the longest ones with what ran in them, and self time summed over all of them.
const stallMs = args.find(a => a.startsWith('--stalls='))?.slice(9)
const stallSelf = new Map<string, number>()
const stallList: Array<{ file: string, at: number, ms: number, top: string }> = []

// tsx compiles each TypeScript file to one minified line and keeps the source map in its cache
// (a JSON file per compiled version, newest last): map profile positions back to the .ts lines.
const B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
type LineMap = Array<Array<[col: number, srcLine: number]>>
function decode (mappings: string): LineMap {
  const lines: LineMap = []
  let srcLine = 0
  for (const line of mappings.split(';')) {
    const segs: Array<[number, number]> = []
    let col = 0
    for (const seg of line.split(',')) {
      if (seg === '') continue
      const values: number[] = []
      let shift = 0
      let value = 0
      for (const ch of seg) {
        const digit = B64.indexOf(ch)
        value += (digit & 31) << shift
        if ((digit & 32) !== 0) { shift += 5; continue }
        values.push((value & 1) === 1 ? -(value >>> 1) : value >>> 1)
        shift = 0
        value = 0
      }
      col += values[0]
      if (values.length >= 4) {
        srcLine += values[2]
        segs.push([col, srcLine])
      }
    }
    lines.push(segs)
  }
  return lines
}
const maps = new Map<string, LineMap | null>()
function mapFor (path: string): LineMap | null {
  if (maps.has(path)) return maps.get(path) as LineMap | null
  let best: { at: number, map: LineMap } | null = null
  for (const dir of readdirSync(tmpdir()).filter(d => d.startsWith('tsx-')).map(d => join(tmpdir(), d))) {
    for (const name of readdirSync(dir)) {
      const file = join(dir, name)
      try {
        const head = readFileSync(file, 'utf8')
        if (!head.startsWith(`{"code":"__filename=\\"${path}\\"`)) continue
        const at = statSync(file).mtimeMs
        if (best === null || at > best.at) best = { at, map: decode(JSON.parse(head).map.mappings) }
      } catch {}
    }
  }
  maps.set(path, best?.map ?? null)
  return best?.map ?? null
}
function sourceLine (path: string, line: number, col: number): number | null {
  const segs = mapFor(path)?.[line]
  if (segs === undefined || segs.length === 0) return null
  let found = segs[0]
  for (const s of segs) {
    if (s[0] > col) break
    found = s
  }
  return found[1] + 1
}

const where = (f: Node['callFrame']): string => {
  const url = f.url.replace(/^file:\/\//, '')
  const path = url.startsWith(root) ? relative(root, url) : url.replace(/^.*node_modules\//, 'node_modules/')
  const line = url.endsWith('.ts') && url.startsWith(root) ? sourceLine(url, f.lineNumber, f.columnNumber) ?? f.lineNumber + 1 : f.lineNumber + 1
  return `${f.functionName === '' ? '(anonymous)' : f.functionName} ${path === '' ? '' : `${path}:${line}`}`.trim()
}

const self = new Map<string, number>()
const inclusiveLib = new Map<string, number>()
const byFile = new Map<string, number>()
let total = 0
for (const file of files) {
  const p = JSON.parse(readFileSync(file, 'utf8')) as Profile
  const byId = new Map(p.nodes.map(n => [n.id, n]))
  const parent = new Map<number, number>()
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id)
  if (stallMs !== undefined) {
    let start = -1
    let at = 0
    let run = new Map<string, number>()
    const end = (i: number, t: number): void => {
      const ms = t - at
      if (start >= 0 && ms >= Number(stallMs)) {
        for (const [k, v] of run) stallSelf.set(k, (stallSelf.get(k) ?? 0) + v)
        stallList.push({ file: file.replace(/^.*\//, ''), at: Math.round(at), ms, top: [...run].sort((a, b) => b[1] - a[1]).slice(0, 3).map(([k, v]) => `${k} ${v.toFixed(1)}`).join('; ') })
      }
      start = -1
      run = new Map()
    }
    let t = 0
    for (let i = 0; i < p.samples.length; i++) {
      const dt = (p.timeDeltas[i + 1] ?? 0) / 1000
      const node = byId.get(p.samples[i]) as Node
      if (node.callFrame.functionName === '(idle)') {
        end(i, t)
      } else {
        if (start < 0) { start = i; at = t }
        const key = where(node.callFrame)
        run.set(key, (run.get(key) ?? 0) + dt)
      }
      t += dt
    }
    end(p.samples.length, t)
  }
  // Time per sample: the delta to the next sample.
  for (let i = 0; i < p.samples.length; i++) {
    const dt = (p.timeDeltas[i + 1] ?? 0) / 1000
    const node = byId.get(p.samples[i]) as Node
    total += dt
    const key = where(node.callFrame)
    self.set(key, (self.get(key) ?? 0) + dt)
    if (stackOf !== undefined && node.callFrame.functionName === stackOf) {
      const path: string[] = []
      for (let id = parent.get(node.id); id !== undefined && path.length < 8; id = parent.get(id)) path.push(where((byId.get(id) as Node).callFrame))
      const k = path.join(' ← ')
      stacks.set(k, (stacks.get(k) ?? 0) + dt)
    }
    if (underOf !== undefined) {
      for (let id = parent.get(node.id); id !== undefined; id = parent.get(id)) {
        if ((byId.get(id) as Node).callFrame.functionName === underOf) {
          under.set(key, (under.get(key) ?? 0) + dt)
          break
        }
      }
    }
    const seen = new Set<string>()
    for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
      const f = (byId.get(id) as Node).callFrame
      const k = where(f)
      if (seen.has(k)) continue
      seen.add(k)
      if (f.url.includes('/lib/') && !f.url.includes('node_modules')) inclusiveLib.set(k, (inclusiveLib.get(k) ?? 0) + dt)
      const file = f.url.includes('node_modules') ? f.url.replace(/^.*node_modules\/((@[^/]+\/)?[^/]+).*$/, '$1') : f.url === '' ? '' : relative(root, f.url.replace(/^file:\/\//, ''))
      const fk = `file ${file}`
      if (file !== '' && !seen.has(fk)) {
        seen.add(fk)
        byFile.set(file, (byFile.get(file) ?? 0) + dt)
      }
    }
  }
}
const pct = (ms: number): string => `${(ms / total * 100).toFixed(1).padStart(5)}%`
const show = (title: string, m: Map<string, number>, n: number): void => {
  process.stdout.write(`\n${title}\n`)
  for (const [k, v] of [...m].sort((a, b) => b[1] - a[1]).slice(0, n)) process.stdout.write(`${pct(v)} ${v.toFixed(0).padStart(7)} ms  ${k}\n`)
}
process.stdout.write(`${files.length} profile(s), ${total.toFixed(0)} ms sampled\n`)
show('Self time by function', self, top)
show('Inclusive time by file or package (any frame on the stack)', byFile, top)
show('Inclusive time of lib/ functions', inclusiveLib, top)
if (stackOf !== undefined) show(`Call paths into ${stackOf}`, stacks, 10)
if (underOf !== undefined) show(`Self time below ${underOf}`, under, top)
if (stallMs !== undefined) {
  process.stdout.write(`\n${stallList.length} stretch(es) of ≥ ${stallMs} ms without an idle sample, ${stallList.reduce((a, x) => a + x.ms, 0).toFixed(0)} ms in all; the longest:\n`)
  for (const x of [...stallList].sort((a, b) => b.ms - a.ms).slice(0, 10)) process.stdout.write(`${x.ms.toFixed(1).padStart(7)} ms at ${x.at} ms in ${x.file}: ${x.top}\n`)
  show('Self time inside those stretches', stallSelf, top)
}
