#!/usr/bin/env node
// Runs npm scripts side by side, each's output held and printed whole when it ends, so that
// `npm test`'s checks (lint, layer rules, type checks, doc samples, build) take as long as the
// slowest of them rather than their sum: most of their time is spent waiting on the disk and the
// other processes of a shared machine, not on a core each. `a+b` runs b after a, in one slot.
// Every script runs to its end; the exit code is 1 when any failed, and the failures are named last.
//
// With `--beside <script>`, that one runs at the same time with its output shown as it comes (the
// test runner, whose own processes wait on timers and the network more than they compute: the
// checks fill those gaps instead of running before it), and the held outputs print as they end.
//
// Usage: node scripts/run-parallel.mjs [--jobs N] [--beside script] script[+script...] ...   (N defaults to 3)
import { spawn } from 'node:child_process'

const args = process.argv.slice(2)
let jobs = 3
let beside
const groups = []
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--jobs') jobs = Number(args[++i])
  else if (args[i] === '--beside') beside = args[++i]
  else groups.push(args[i].split('+'))
}
if (groups.length === 0 || !(jobs >= 1) || beside === '') {
  console.error('usage: node scripts/run-parallel.mjs [--jobs N] [--beside script] script[+script...] ...')
  process.exit(2)
}

const npm = process.env.npm_execpath
function runScript (name, live = false) {
  const started = Date.now()
  const stdio = live ? 'inherit' : ['ignore', 'pipe', 'pipe']
  // Through npm, as `npm run <name>` would (its PATH with node_modules/.bin).
  const child = npm !== undefined && npm.endsWith('.js')
    ? spawn(process.execPath, [npm, 'run', '--silent', name], { stdio })
    : spawn('npm', ['run', '--silent', name], { stdio })
  let output = ''
  child.stdout?.on('data', chunk => { output += chunk })
  child.stderr?.on('data', chunk => { output += chunk })
  return new Promise(resolve => {
    child.once('error', err => { output += String(err); resolve({ name, ok: false, output, ms: Date.now() - started }) })
    child.once('close', code => resolve({ name, ok: code === 0, output, ms: Date.now() - started }))
  })
}

const failed = []
const queue = [...groups]
async function slot () {
  for (let group = queue.shift(); group !== undefined; group = queue.shift()) {
    for (const name of group) {
      const { ok, output, ms } = await runScript(name)
      process.stdout.write(`> ${name}: ${ok ? 'ok' : 'FAILED'} (${(ms / 1000).toFixed(1)} s)\n${output}${output === '' || output.endsWith('\n') ? '' : '\n'}`)
      if (!ok) { failed.push(name); break }
    }
  }
}
const besideRun = beside === undefined
  ? undefined
  : runScript(beside, true).then(({ ok }) => { if (!ok) failed.push(beside) })
await Promise.all(Array.from({ length: Math.min(jobs, groups.length) }, slot))
await besideRun
if (failed.length > 0) {
  console.error(`run-parallel: failed: ${failed.join(', ')}`)
  process.exit(1)
}
