'use strict'
// Loads TypeScript in the test processes (tap's `node-arg` in package.json, in place of tap's own
// TypeScript plugin, which compiled every file anew in each of the suite's processes at about 3 s
// of CPU each). Each `.ts` file is transformed by esbuild to CommonJS, types stripped, layout kept,
// with an inline source map: stack traces and coverage point at the TypeScript lines. Nothing is
// type-checked here: `npm test` runs tsc before tap.
const { readFileSync } = require('node:fs')
const { register } = require('node:module')
const { transformSync } = require('esbuild')

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

// eslint-disable-next-line n/no-deprecated-api -- Node 20's only hook into require()'s loading
require.extensions['.ts'] = function compileTs (module, filename) {
  const { code } = transformSync(readFileSync(filename, 'utf8'), { ...OPTIONS, sourcefile: filename })
  module._compile(code, filename)
}

// tap starts each test file through the ES module loader, which does not know `.ts`: this hook
// says such a file is CommonJS, so the loader hands it to require() and the hook above.
register('data:text/javascript,' + encodeURIComponent(
  'export async function load (url, context, next) {' +
  '  if (url.startsWith("file:") && url.endsWith(".ts")) return { format: "commonjs", shortCircuit: true };' +
  '  return next(url, context) }'
))
