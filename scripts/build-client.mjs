// Builds fastify-job-progress/client and /react as ES modules (dist/client/*.mjs) with esbuild,
// and their declarations with tsc. The client has no runtime dependencies; React stays external.
// bench/client-size.ts measures the client with `clientBuild`, the options used here.
import { build } from 'esbuild'
import { execFileSync } from 'node:child_process'
import { readdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const root = fileURLToPath(new URL('..', import.meta.url))

/**
 * The options every client file is built with. Internal properties (a leading `_`, as Watch's
 * `_update`, or a trailing one, as the transports' `w_`) are renamed to short names: no public
 * name and no name of the wire format has either.
 */
export const clientBuild = { bundle: true, format: 'esm', platform: 'neutral', target: 'es2022', absWorkingDir: root, legalComments: 'none', mangleProps: /^_|_$/ }

/**
 * The package's client (dist/client/index.mjs) keeps what is loaded on first use (the SSE and
 * polling fallbacks, the upload and other HTTP requests, the reading of a list of the caller's
 * jobs) in chunks of their own, which a page's bundler turns into its own lazy chunks.
 */
export const clientSplit = { splitting: true, entryNames: '[name]', chunkNames: '[name]-[hash]', outExtension: { '.js': '.mjs' } }

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  // Chunks of an earlier build go (their names change with their content).
  const out = join(root, 'dist', 'client')
  try {
    for (const name of readdirSync(out)) if (/-[A-Z0-9]{8}\.mjs$/.test(name)) rmSync(join(out, name))
  } catch {}
  await build({ ...clientBuild, ...clientSplit, entryPoints: ['client/index.ts'], outdir: 'dist/client' })
  // One file, every chunk in it, as `clientRoute` serves it to a page without a bundler.
  await build({ ...clientBuild, entryPoints: ['client/index.ts'], outfile: 'dist/client/index.min.mjs', minify: true })
  await build({
    ...clientBuild,
    entryPoints: ['client/react.ts'],
    outfile: 'dist/client/react.mjs',
    external: ['react'],
    // The hooks use the one client module, not a copy of it.
    plugins: [{ name: 'client-external', setup (b) { b.onResolve({ filter: /^\.\/index$/ }, () => ({ path: './index.mjs', external: true })) } }]
  })
  if (!process.argv.includes('--js-only')) execFileSync(process.execPath, [fileURLToPath(new URL('../node_modules/typescript/bin/tsc', import.meta.url)), '-p', 'client'], { cwd: root, stdio: 'inherit' })
}
