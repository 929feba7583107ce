/**
 * Client bundle size: each client's main entry bundled for the browser by the same esbuild call
 * (ESM, minified, tree-shaken to what importing its main export keeps), then gzipped at level 9.
 * Ours is built with the options that build what ships (scripts/build-client.mjs: `clientBuild`
 * and `clientSplit`, internal properties renamed, the parts used on first use in chunks of their
 * own). The first row is the one compared: what a page loads to create the client and watch over
 * a WebSocket (the entry chunk and the chunks it imports, as one file). The second is what loads
 * on first use (the SSE and polling fallbacks, the upload and other HTTP requests, the reading of
 * a list of the caller's jobs); the third, the whole module in one file as `clientRoute` serves
 * it (every export, every chunk, the close-code table), for reference.
 *
 *   npx tsx bench/client-size.ts    # prints the table, writes bench/results/client-size.json
 */
import { build, type BuildOptions } from 'esbuild'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'

const root = join(__dirname, '..')
const FIRST = 'fastify-job-progress/client'
const LAZY = 'fastify-job-progress/client (loaded on first use)'
const clients: Array<[string, string]> = [
  ['fastify-job-progress/client (all exports, one file)', `export * from ${JSON.stringify(join(root, 'client', 'index.ts'))}`],
  ['socket.io-client', "import { io } from 'socket.io-client'; globalThis.x = io"],
  ['centrifuge', "import { Centrifuge } from 'centrifuge'; globalThis.x = Centrifuge"],
  ['pusher-js', "import Pusher from 'pusher-js'; globalThis.x = Pusher"]
]

function version (name: string): string {
  if (name.startsWith('fastify-job-progress')) return (require(join(root, 'package.json')) as { version: string }).version
  return (require(join(root, 'node_modules', name, 'package.json')) as { version: string }).version
}

const common: BuildOptions = { bundle: true, minify: true, format: 'esm', platform: 'browser', target: 'es2022', write: false, legalComments: 'none', logLevel: 'silent' }
type Row = { name: string, version: string, minBytes: number, gzipBytes: number }
const row = (name: string, code: Uint8Array): Row => ({ name, version: version(name), minBytes: code.byteLength, gzipBytes: gzipSync(code, { level: 9 }).byteLength })

/** Our client built as it ships, split: what creating the client loads, and what loads on first use. */
async function split (options: BuildOptions): Promise<Row[]> {
  const dir = mkdtempSync(join(tmpdir(), 'jp-client-size-'))
  try {
    writeFileSync(join(dir, 'entry.ts'), `import { JobProgressClient } from ${JSON.stringify(join(root, 'client', 'index.ts'))}; (globalThis as any).x = JobProgressClient`)
    const out = await build({ ...common, ...options, entryPoints: [join(dir, 'entry.ts')], outdir: join(dir, 'out'), absWorkingDir: dir, metafile: true })
    const outputs = (out.metafile as { outputs: Record<string, { entryPoint?: string, imports: Array<{ path: string, kind: string }> }> }).outputs
    const first = new Set<string>()
    const walk = (path: string): void => {
      if (first.has(path)) return
      first.add(path)
      for (const i of outputs[path].imports) if (i.kind === 'import-statement') walk(i.path)
    }
    walk(Object.keys(outputs).find(path => outputs[path].entryPoint !== undefined) as string)
    const code = (firstLoad: boolean): Uint8Array => Buffer.concat((out.outputFiles ?? []).filter(f => first.has(join('out', f.path.slice(join(dir, 'out').length + 1))) === firstLoad).map(f => f.contents))
    return [row(FIRST, code(true)), row(LAZY, code(false))]
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
}

async function main (): Promise<void> {
  const { clientBuild, clientSplit } = await import(join(root, 'scripts', 'build-client.mjs')) as { clientBuild: BuildOptions, clientSplit: BuildOptions }
  const rows = await split({ mangleProps: clientBuild.mangleProps, ...clientSplit })
  for (const [name, source] of clients) {
    const out = await build({
      ...common,
      ...(name.startsWith('fastify-job-progress') ? { mangleProps: clientBuild.mangleProps } : {}),
      stdin: { contents: source, resolveDir: root, loader: 'ts' }
    })
    rows.push(row(name, (out.outputFiles ?? [])[0].contents))
  }
  const ours = rows[0].gzipBytes
  const sio = rows.find(r => r.name === 'socket.io-client')?.gzipBytes ?? 1
  console.log('| client | version | min KB | min+gz KB | vs socket.io-client |')
  console.log('| --- | --- | --- | --- | --- |')
  for (const r of rows) console.log(`| ${r.name} | ${r.version} | ${(r.minBytes / 1024).toFixed(1)} | ${(r.gzipBytes / 1024).toFixed(1)} | ${(r.gzipBytes / sio).toFixed(2)} |`)
  console.log(`\nfastify-job-progress/client is ${ours} B, ${(ours / sio * 100).toFixed(1)}% of socket.io-client's ${sio} B (goal: at most 33%)`)
  writeFileSync(join(root, 'bench', 'results', 'client-size.json'), JSON.stringify({ date: new Date().toISOString(), esbuild: version('esbuild'), rows }, null, 2) + '\n')
}

void main()
