/**
 * Client bundle size: each client's main entry bundled for the browser by the same esbuild call
 * (ESM, minified, tree-shaken to what importing its main export keeps), then gzipped at level 9.
 * Ours is built with the options that build what ships (scripts/build-client.mjs: `clientBuild`,
 * its internal properties renamed). The first row (the client class and everything it uses) is
 * the one compared; the second is the whole module as `clientRoute` serves it (every export, the
 * close-code table included), for reference.
 *
 *   npx tsx bench/client-size.ts    # prints the table, writes bench/results/client-size.json
 */
import { build } from 'esbuild'
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'

const root = join(__dirname, '..')
const clients: Array<[string, string]> = [
  ['fastify-job-progress/client', `import { JobProgressClient } from ${JSON.stringify(join(root, 'client', 'index.ts'))}; globalThis.x = JobProgressClient`],
  ['fastify-job-progress/client (all exports)', `export * from ${JSON.stringify(join(root, 'client', 'index.ts'))}`],
  ['socket.io-client', "import { io } from 'socket.io-client'; globalThis.x = io"],
  ['centrifuge', "import { Centrifuge } from 'centrifuge'; globalThis.x = Centrifuge"],
  ['pusher-js', "import Pusher from 'pusher-js'; globalThis.x = Pusher"]
]

function version (name: string): string {
  if (name.startsWith('fastify-job-progress')) return (require(join(root, 'package.json')) as { version: string }).version
  return (require(join(root, 'node_modules', name, 'package.json')) as { version: string }).version
}

async function main (): Promise<void> {
  const { clientBuild } = await import(join(root, 'scripts', 'build-client.mjs')) as { clientBuild: Record<string, unknown> }
  const rows: Array<{ name: string, version: string, minBytes: number, gzipBytes: number }> = []
  for (const [name, source] of clients) {
    const out = await build({
      ...(name.startsWith('fastify-job-progress') ? { mangleProps: clientBuild.mangleProps as RegExp } : {}),
      stdin: { contents: source, resolveDir: root, loader: 'ts' },
      bundle: true,
      minify: true,
      format: 'esm',
      platform: 'browser',
      target: 'es2022',
      write: false,
      legalComments: 'none',
      logLevel: 'silent'
    })
    const code = out.outputFiles[0].contents
    rows.push({ name, version: version(name), minBytes: code.byteLength, gzipBytes: gzipSync(code, { level: 9 }).byteLength })
  }
  const ours = rows[0].gzipBytes
  const sio = rows.find(r => r.name === 'socket.io-client')?.gzipBytes ?? 1
  console.log('| client | version | min KB | min+gz KB | vs socket.io-client |')
  console.log('| --- | --- | --- | --- | --- |')
  for (const r of rows) console.log(`| ${r.name} | ${r.version} | ${(r.minBytes / 1024).toFixed(1)} | ${(r.gzipBytes / 1024).toFixed(1)} | ${(r.gzipBytes / sio).toFixed(2)} |`)
  console.log(`\nfastify-job-progress/client is ${(ours / sio * 100).toFixed(0)}% of socket.io-client (goal: at most 33%)`)
  writeFileSync(join(root, 'bench', 'results', 'client-size.json'), JSON.stringify({ date: new Date().toISOString(), esbuild: version('esbuild'), rows }, null, 2) + '\n')
}

void main()
