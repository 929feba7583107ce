import { readFileSync } from 'node:fs'

/**
 * What holds what grew between two heap snapshots of one process (bench/sockets.ts
 * `--snapshots`): the objects of the second that were not in the first, grouped by their kind
 * and the object and property that hold them (one holder, the first found), bytes and objects
 * divided by a count (the sockets opened). Where bench/heap-diff.ts says "arrays" and "strings",
 * this says whose.
 *
 *   npx tsx bench/heap-retainers.ts before.heapsnapshot after.heapsnapshot 10000 [--top=40] [--depth=1]
 */
const [beforeFile, afterFile, perArg] = process.argv.slice(2)
const per = Number(perArg ?? 1)
const top = Number(process.argv.find(a => a.startsWith('--top='))?.slice(6) ?? 40)
/** How many holders to name, nearest first. */
const depth = Number(process.argv.find(a => a.startsWith('--depth='))?.slice(8) ?? 1)

interface Snapshot {
  snapshot: { meta: { node_fields: string[], node_types: [string[]], edge_fields: string[], edge_types: [string[]] } }
  nodes: number[]
  edges: number[]
  strings: string[]
}

const load = (file: string): Snapshot => JSON.parse(readFileSync(file, 'utf8')) as Snapshot

function ids (snap: Snapshot): Set<number> {
  const fields = snap.snapshot.meta.node_fields
  const width = fields.length
  const iId = fields.indexOf('id')
  const out = new Set<number>()
  for (let i = 0; i < snap.nodes.length; i += width) out.add(snap.nodes[i + iId])
  return out
}

const old = ids(load(beforeFile))
const snap = load(afterFile)
const meta = snap.snapshot.meta
const width = meta.node_fields.length
const [iType, iName, iId, iSize, iEdges] = ['type', 'name', 'id', 'self_size', 'edge_count'].map(f => meta.node_fields.indexOf(f))
const ew = meta.edge_fields.length
const [eType, eName, eTo] = ['type', 'name_or_index', 'to_node'].map(f => meta.edge_fields.indexOf(f))
const nodeTypes = meta.node_types[0]
const edgeTypes = meta.edge_types[0]
const count = snap.nodes.length / width
const label = (n: number): string => {
  const type = nodeTypes[snap.nodes[n * width + iType]]
  const name = type === 'object' || type === 'closure' || type === 'native' ? snap.strings[snap.nodes[n * width + iName]] : `(${type})`
  return `${type === 'closure' ? 'closure ' : ''}${String(name).slice(0, 40)}`
}
// The first holder of each node, through a property, an element or a context variable (not weak or hidden links).
const holder = new Int32Array(count).fill(-1)
const via = new Array<string>(count)
let edge = 0
for (let n = 0; n < count; n++) {
  const edges = snap.nodes[n * width + iEdges]
  for (let k = 0; k < edges; k++, edge += ew) {
    const t = edgeTypes[snap.edges[edge + eType]]
    if (t === 'weak' || t === 'shortcut') continue
    const to = snap.edges[edge + eTo] / width
    if (holder[to] !== -1) continue
    const name = snap.edges[edge + eName]
    holder[to] = n
    via[to] = t === 'element' || t === 'hidden' ? `[${t}]` : String(t === 'context' || t === 'property' || t === 'internal' ? snap.strings[name] : name)
  }
}
const out = new Map<string, { count: number, bytes: number }>()
let total = 0
for (let n = 0; n < count; n++) {
  if (old.has(snap.nodes[n * width + iId])) continue
  let key = label(n)
  for (let m = n, d = 0; d < depth; d++) {
    const h = holder[m]
    key += `  <-  ${h === -1 ? '?' : `${label(h)}.${via[m]}`}`
    if (h === -1) break
    m = h
  }
  const t = out.get(key) ?? { count: 0, bytes: 0 }
  t.count++
  t.bytes += snap.nodes[n * width + iSize]
  total += snap.nodes[n * width + iSize]
  out.set(key, t)
}
process.stdout.write(`new objects: ${(total / per).toFixed(0)} bytes per unit (${per} units)\n`)
for (const [k, v] of [...out].sort((a, b) => b[1].bytes - a[1].bytes).slice(0, top)) {
  process.stdout.write(`${(v.bytes / per).toFixed(0).padStart(7)} B ${(v.count / per).toFixed(2).padStart(7)} objs  ${k}\n`)
}
