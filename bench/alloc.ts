import { readFileSync } from 'node:fs'
import { relative } from 'node:path'

/**
 * Summarises sampling heap profiles (`.heapprofile`, written next to each `.cpuprofile` by
 * `npm run bench -- --profile`): bytes allocated per function and per file or package, over the
 * measured step, garbage included (the bench's IPC and the profiler's own traffic left out).
 * Allocation is sampled, so figures are estimates.
 *
 *   npx tsx bench/alloc.ts bench/results/fanout-plugin-2-0-R10-round0.heapprofile [...] [--top=25]
 */
interface Node { callFrame: { functionName: string, url: string, lineNumber: number }, selfSize: number, children: Node[] }

const args = process.argv.slice(2)
const top = Number(args.find(a => a.startsWith('--top='))?.slice(6) ?? 25)
const files = args.filter(a => !a.startsWith('--'))
const root = process.cwd()
const byFunction = new Map<string, number>()
const byFile = new Map<string, number>()
let total = 0

const fileOf = (url: string): string => url.includes('node_modules') ? url.replace(/^.*node_modules\/((@[^/]+\/)?[^/]+).*$/, '$1') : url === '' ? '(native)' : relative(root, url.replace(/^file:\/\//, ''))
function walk (node: Node, stack: string[]): void {
  const f = node.callFrame
  const file = fileOf(f.url)
  // The profiler's own traffic and the bench's IPC are not the system's.
  if (file === 'node:inspector' || file.startsWith('bench/lib/')) return
  const key = `${f.functionName === '' ? '(anonymous)' : f.functionName} ${file}${f.url === '' ? '' : `:${f.lineNumber + 1}`}`
  if (node.selfSize > 0) {
    total += node.selfSize
    byFunction.set(key, (byFunction.get(key) ?? 0) + node.selfSize)
    // Charge the bytes to every file on the stack once, so that lib/ gets what its calls allocate.
    for (const fl of new Set([file, ...stack])) byFile.set(fl, (byFile.get(fl) ?? 0) + node.selfSize)
  }
  for (const child of node.children) walk(child, [...stack, file])
}
for (const file of files) walk(JSON.parse(readFileSync(file, 'utf8')).head as Node, [])
const show = (title: string, m: Map<string, number>): void => {
  process.stdout.write(`\n${title}\n`)
  for (const [k, v] of [...m].sort((a, b) => b[1] - a[1]).slice(0, top)) process.stdout.write(`${(v / total * 100).toFixed(1).padStart(5)}% ${(v / 2 ** 20).toFixed(1).padStart(7)} MB  ${k}\n`)
}
process.stdout.write(`${files.length} profile(s), ${(total / 2 ** 20).toFixed(1)} MB sampled\n`)
show('Allocated by function', byFunction)
show('Allocated under file or package (any frame on the stack)', byFile)
