#!/usr/bin/env node
// Type-checks every ```ts / ```typescript block of README.md and docs/**/*.md against the local
// sources, so that a renamed option or method breaks `npm test` instead of the docs going stale.
//
// Each block becomes a module of its own in a temp directory (removed at the end, also on failure),
// compiled with `noEmit` by a generated tsconfig whose `paths` resolve `fastify-job-progress`,
// `fastify-job-progress/client` and `fastify-job-progress/react` to lib/ and client/. Errors are
// reported at the Markdown file and line. A block that is a fragment and cannot compile is marked
// by `<!-- not-compiled: reason -->` on the line before its fence (use sparingly).
//
// Usage: node scripts/check-doc-samples.mjs [--keep]   (--keep leaves the temp directory, to debug)
import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'
import { createRequire } from 'node:module'

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const ts = createRequire(join(ROOT, 'package.json'))('typescript')
const keep = process.argv.includes('--keep')

// Names the samples use without defining them: the reader's own code (an app, a file, a parser),
// declared once here with their types so that everything else in a sample is checked for real.
const GLOBALS = `
import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { Redis } from 'ioredis'
import type { Readable } from 'node:stream'
import type { JobProgressOptions } from 'fastify-job-progress'

declare global {
  /** The reader's Fastify app. */
  const app: FastifyInstance
  /** The reader's kinds, ioredis client, secrets. */
  const kinds: JobProgressOptions['kinds']
  const redis: Redis
  const key: Buffer
  const secret: string
  /** A file the user picked, and a signal to abort its upload. */
  const file: File
  const signal: AbortSignal
  /** The reader's own functions. */
  function parse (input: Readable): Promise<string[]>
  function check (row: string): Promise<void>
  function chat (socket: unknown, request: FastifyRequest): void
  function alreadySeen (webhookId: string): Promise<boolean>
  function handle (event: unknown): Promise<void>
  const myFiles: { ownedBy (owner: string, key: string): Promise<{ key: string, name: string, size: number, type: string } | null> }
  const teams: { sameTeam (a: string, b: string): Promise<boolean>, isAdmin (a: string): Promise<boolean> }
}
`

function markdownFiles () {
  const out = [join(ROOT, 'README.md')]
  const walk = (dir) => {
    for (const entry of readdirSync(dir, { withFileTypes: true }).sort((a, b) => a.name.localeCompare(b.name))) {
      const path = join(dir, entry.name)
      if (entry.isDirectory()) walk(path)
      else if (entry.name.endsWith('.md')) out.push(path)
    }
  }
  walk(join(ROOT, 'docs'))
  return out
}

/** The ts blocks of one Markdown file: { line (of the first code line, 1-based), code } or { skipped }. */
function extract (path) {
  const lines = readFileSync(path, 'utf8').split('\n')
  const blocks = []
  for (let i = 0; i < lines.length; i++) {
    const open = /^(\s*)(`{3,}|~{3,})\s*([\w-]*)/.exec(lines[i])
    if (open === null) continue
    const [, indent, fence, lang] = open
    let end = i + 1
    while (end < lines.length && !lines[end].trimStart().startsWith(fence)) end++
    if (lang === 'ts' || lang === 'typescript') {
      let prev = i - 1
      while (prev >= 0 && lines[prev].trim() === '') prev--
      const mark = prev >= 0 ? /^<!--\s*not-compiled:\s*(.*?)\s*-->$/.exec(lines[prev].trim()) : null
      const code = lines.slice(i + 1, end).map(l => l.startsWith(indent) ? l.slice(indent.length) : l).join('\n')
      blocks.push({ line: i + 2, code, skipped: mark === null ? null : (mark[1] || 'no reason given') })
    }
    i = end
  }
  return blocks
}

const dir = mkdtempSync(join(tmpdir(), 'jp-doc-samples-'))
const cleanup = () => { if (!keep) rmSync(dir, { recursive: true, force: true }) }
for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => { cleanup(); process.exit(130) })

let failed = false
try {
  // The project's node_modules, seen from the temp directory, for every bare import of a sample.
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'), 'dir')
  mkdirSync(join(dir, 'samples'))
  writeFileSync(join(dir, 'globals.d.ts'), GLOBALS)

  const where = new Map() // sample file → { md, line }
  const skipped = []
  for (const md of markdownFiles()) {
    const rel = relative(ROOT, md)
    for (const block of extract(md)) {
      if (block.skipped !== null) { skipped.push(`${rel}:${block.line - 1} (${block.skipped})`); continue }
      const file = join(dir, 'samples', `${rel.replace(/[/\\.]/g, '_')}_L${block.line}.ts`)
      // `export {}` makes each block a module: its own scope, top-level await allowed.
      writeFileSync(file, `${block.code}\nexport {}\n`)
      where.set(file, { md: rel, line: block.line })
    }
  }

  const config = {
    compilerOptions: {
      target: 'ES2022',
      module: 'ESNext',
      moduleResolution: 'bundler',
      lib: ['ES2023', 'DOM', 'DOM.Iterable'],
      types: ['node'],
      strict: true,
      esModuleInterop: true,
      skipLibCheck: true,
      noEmit: true,
      jsx: 'react-jsx',
      paths: {
        'fastify-job-progress': [join(ROOT, 'lib/index.ts')],
        'fastify-job-progress/client': [join(ROOT, 'client/index.ts')],
        'fastify-job-progress/react': [join(ROOT, 'client/react.ts')]
      }
    },
    files: [join(dir, 'globals.d.ts'), ...where.keys()]
  }
  const configPath = join(dir, 'tsconfig.json')
  writeFileSync(configPath, JSON.stringify(config, null, 2))
  const parsed = ts.parseJsonConfigFileContent(config, ts.sys, dir, undefined, configPath)
  const program = ts.createProgram({ rootNames: parsed.fileNames, options: parsed.options })
  const diagnostics = ts.getPreEmitDiagnostics(program)

  for (const d of diagnostics) {
    const message = ts.flattenDiagnosticMessageText(d.messageText, '\n  ')
    if (d.file === undefined) { console.error(`error TS${d.code}: ${message}`); failed = true; continue }
    const { line } = d.file.getLineAndCharacterOfPosition(d.start ?? 0)
    const at = where.get(resolve(d.file.fileName))
    const place = at === undefined ? `${relative(ROOT, d.file.fileName)}:${line + 1}` : `${at.md}:${at.line + line}`
    console.error(`${place}: error TS${d.code}: ${message}`)
    failed = true
  }
  const summary = `${where.size} TypeScript samples checked` + (skipped.length > 0 ? `, ${skipped.length} marked not-compiled: ${skipped.join('; ')}` : '')
  if (failed) console.error(`check-doc-samples: ${diagnostics.length} error(s); ${summary}`)
  else console.log(`check-doc-samples: ${summary}, no errors`)
} catch (err) {
  console.error(err)
  failed = true
} finally {
  cleanup()
}
process.exit(failed ? 1 : 0)
