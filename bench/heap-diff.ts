import { readFileSync } from 'node:fs'

/**
 * What grew between two heap snapshots (`npm run bench -- --profile` writes them around the idle
 * sockets): objects and bytes per constructor, divided by a count (the sockets opened).
 *
 *   npx tsx bench/heap-diff.ts before.heapsnapshot after.heapsnapshot 10000 [--top=25]
 */
const [beforeFile, afterFile, perArg] = process.argv.slice(2)
const per = Number(perArg ?? 1)
const top = Number(process.argv.find(a => a.startsWith('--top='))?.slice(6) ?? 25)

function tally (file: string): Map<string, { count: number, bytes: number }> {
  const snap = JSON.parse(readFileSync(file, 'utf8'))
  const fields: string[] = snap.snapshot.meta.node_fields
  const types: string[] = snap.snapshot.meta.node_types[0]
  const width = fields.length
  const [iType, iName, iSize] = ['type', 'name', 'self_size'].map(f => fields.indexOf(f))
  const out = new Map<string, { count: number, bytes: number }>()
  const nodes: number[] = snap.nodes
  for (let i = 0; i < nodes.length; i += width) {
    const type = types[nodes[i + iType]]
    const name = type === 'object' || type === 'closure' || type === 'native' ? snap.strings[nodes[i + iName]] : `(${type})`
    const key = `${type === 'closure' ? 'closure ' : ''}${String(name).slice(0, 60)}`
    const t = out.get(key) ?? { count: 0, bytes: 0 }
    t.count++
    t.bytes += nodes[i + iSize]
    out.set(key, t)
  }
  return out
}

const a = tally(beforeFile)
const b = tally(afterFile)
const rows = [...b].map(([k, v]) => ({ k, count: v.count - (a.get(k)?.count ?? 0), bytes: v.bytes - (a.get(k)?.bytes ?? 0) }))
  .sort((x, y) => y.bytes - x.bytes).slice(0, top)
const total = [...b.values()].reduce((s, v) => s + v.bytes, 0) - [...a.values()].reduce((s, v) => s + v.bytes, 0)
process.stdout.write(`heap growth ${(total / per).toFixed(0)} bytes per unit (${per} units)\n`)
for (const r of rows) process.stdout.write(`${(r.bytes / per).toFixed(0).padStart(7)} B ${(r.count / per).toFixed(2).padStart(7)} objs  ${r.k}\n`)
