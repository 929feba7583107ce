'use strict'
// Loads TypeScript in the test processes (tap's `node-arg` in package.json, in place of tap's own
// TypeScript plugin, which compiled every file anew in each of the suite's processes at about 3 s
// of CPU each). Each `.ts` file is transformed by esbuild to CommonJS, types stripped, with an
// inline source map: stack traces and coverage point at the TypeScript lines. Nothing is
// type-checked here: `npm test` runs tsc before tap.
//
// The output is kept on disk (node_modules/.cache/ts-register/, one entry per source file, named by
// its path, checked against a hash of the source, esbuild's version and the options): the suite
// starts well over a hundred processes that each load about 100 files, and esbuild's service process spent
// 0.3 s of CPU on them per process (not counted in the test process's own time) plus 0.15 s in the
// process itself. An entry is written to a temporary name and renamed, so processes that load the
// same file at once never read half an entry.
const { createHash } = require('node:crypto')
const { mkdirSync, readFileSync, renameSync, writeFileSync } = require('node:fs')
const { register } = require('node:module')
const { join } = require('node:path')

const OPTIONS = {
  loader: 'ts',
  format: 'cjs',
  target: 'node20',
  sourcemap: 'inline',
  sourcesContent: true,
  // `await import('./x')` becomes a require(), as tsc's CommonJS output does.
  supported: { 'dynamic-import': false },
  tsconfigRaw: { compilerOptions: { esModuleInterop: true, useDefineForClassFields: true } }
}

const CACHE = join(__dirname, '..', '..', 'node_modules', '.cache', 'ts-register')
// What else decides the output: the hook's options and esbuild's version.
const SALT = JSON.stringify(OPTIONS) + require('esbuild/package.json').version
let esbuild = null
let cacheMade = false

function compile (source, filename) {
  const hash = createHash('sha256').update(SALT).update('\0').update(filename).update('\0').update(source).digest('hex')
  const entry = join(CACHE, createHash('sha256').update(filename).digest('hex').slice(0, 32) + '.js')
  const header = `// ${hash}\n`
  try {
    const cached = readFileSync(entry, 'utf8')
    if (cached.startsWith(header)) return cached.slice(header.length)
  } catch {}
  esbuild ??= require('esbuild')
  const { code } = esbuild.transformSync(source, { ...OPTIONS, sourcefile: filename })
  try {
    if (!cacheMade) mkdirSync(CACHE, { recursive: true })
    cacheMade = true
    const temp = `${entry}.${process.pid}.tmp`
    writeFileSync(temp, header + code)
    renameSync(temp, entry)
  } catch {} // a read-only tree: compiled each time, as without the cache
  return code
}

// eslint-disable-next-line n/no-deprecated-api -- Node 20's only hook into require()'s loading
require.extensions['.ts'] = function compileTs (module, filename) {
  module._compile(compile(readFileSync(filename, 'utf8'), filename), filename)
}

// tap's first run after an install still loads its own TypeScript plugin (see
// scripts/ensure-tools.mjs): it would compile the files a second way, at other lines.
if (process.execArgv.some(arg => arg.includes('@tapjs/typescript'))) {
  process.stderr.write("tap's TypeScript plugin is loaded (its build predates package.json's plugin list): this run's coverage is wrong; `npx tap build` or `npm test` fixes it\n")
}

// tap starts each test file through the ES module loader, which does not know `.ts`: this hook
// says such a file is CommonJS, so the loader hands it to require() and the hook above.
register('data:text/javascript,' + encodeURIComponent(
  'export async function load (url, context, next) {' +
  '  if (url.startsWith("file:") && url.endsWith(".ts")) return { format: "commonjs", shortCircuit: true };' +
  '  return next(url, context) }'
))
