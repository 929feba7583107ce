// The package as users install it: builds, runs `npm pack`, installs the tarball into a fresh app
// under the system's temp directory (its dependencies from the npm registry only) and uses it as
// an ESM app, a CommonJS app, a strict TypeScript app, a browser bundle and a page without a
// bundler would. Prints the tarball's files and size; refuses files a user does not need.
// Usage: node scripts/test-package.mjs [--no-build]
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

const ROOT = resolve(import.meta.dirname ?? new URL('.', import.meta.url).pathname, '..')
const started = Date.now()
const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8'))
const temp = mkdtempSync(join(tmpdir(), 'jp-package-'))
const children = []
const results = []

function run (cmd, args, opts = {}) {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], ...opts })
}

async function freePort () {
  return await new Promise((resolve, reject) => {
    const server = createServer().listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    }).on('error', reject)
  })
}

async function step (name, fn) {
  const t0 = Date.now()
  try {
    const detail = await fn()
    results.push({ name, ok: true, ms: Date.now() - t0, detail })
    console.log(`ok   ${name} (${Date.now() - t0} ms)${detail ? ': ' + detail : ''}`)
  } catch (err) {
    results.push({ name, ok: false, ms: Date.now() - t0 })
    console.log(`FAIL ${name}: ${err.stderr || err.stdout || err.stack}`)
  }
}

/** What the tarball must hold, and must not: sources, tests, the bench, the example. */
function checkContents (files) {
  const problems = []
  const paths = new Set(files.map(f => f.path))
  const targets = [pkg.main, pkg.types]
  for (const entry of Object.values(pkg.exports)) {
    if (typeof entry === 'string') targets.push(entry)
    else for (const v of Object.values(entry)) typeof v === 'string' ? targets.push(v) : targets.push(...Object.values(v))
  }
  for (const target of targets) {
    const path = target.replace(/^\.\//, '')
    if (path !== 'package.json' && !paths.has(path)) problems.push(`${target} (named in package.json) is not in the tarball`)
  }
  for (const path of paths) {
    if (/^(test|bench|example|scripts|lib|client|docs|deploy)\//.test(path) || /\.test\.|\.tsbuildinfo$/.test(path)) problems.push(`${path} should not ship`)
    if (/\.ts$/.test(path) && !/\.d\.m?ts$/.test(path)) problems.push(`${path}: a TypeScript source ships`)
  }
  if (problems.length > 0) throw new Error(problems.join('\n'))
}

try {
  if (!process.argv.includes('--no-build')) run('npm', ['run', 'build'], { cwd: ROOT })

  let tarball
  await step('npm pack', async () => {
    const [info] = JSON.parse(run('npm', ['pack', '--json', '--pack-destination', temp], { cwd: ROOT }))
    tarball = join(temp, info.filename)
    console.log(`\n${info.filename}: ${info.entryCount} files, ${(info.size / 1024).toFixed(1)} KiB packed, ${(info.unpackedSize / 1024).toFixed(1)} KiB unpacked`)
    for (const f of info.files) console.log(`  ${String(f.size).padStart(7)}  ${f.path}`)
    console.log('')
    checkContents(info.files)
    return `${info.entryCount} files, ${(info.size / 1024).toFixed(1)} KiB`
  })
  if (tarball === undefined) throw new Error('no tarball')

  // One app, installed as a user would: the tarball, its dependencies from the registry, and the
  // consumers' own tools (types for Node; TypeScript and esbuild at the versions this repo uses).
  const app = join(temp, 'app')
  const dev = pkg.devDependencies
  await step('npm install of the tarball into a new app', async () => {
    execFileSync('mkdir', ['-p', app])
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'jp-consumer', private: true, type: 'module' }, null, 2))
    run('npm', ['install', '--no-audit', '--no-fund', '--registry=https://registry.npmjs.org/', tarball,
      `typescript@${dev.typescript}`, `esbuild@${dev.esbuild}`, `@types/node@${dev['@types/node']}`], { cwd: app })
    return `fastify-job-progress ${JSON.parse(readFileSync(join(app, 'node_modules/fastify-job-progress/package.json'), 'utf8')).version}`
  })

  const redisPort = await freePort()
  const redis = spawn('redis-server', ['--port', String(redisPort), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1'], { stdio: 'ignore' })
  children.push(redis)
  for (let i = 0; i < 50; i++) {
    try { run('redis-cli', ['-p', String(redisPort), 'ping']); break } catch { await new Promise(resolve => setTimeout(resolve, 100)) }
  }
  const env = { ...process.env, REDIS_URL: `redis://127.0.0.1:${redisPort}` }

  writeFileSync(join(app, 'esm.mjs'), `
import Fastify from 'fastify'
import jobProgress, { createJobWorker, DiskStorage, errors, jobsProtocol } from 'fastify-job-progress'
import { writeFileSync } from 'node:fs'
const dir = process.argv[2]
const app = Fastify()
await app.register(jobProgress, { connection: process.env.REDIS_URL, uploadDir: dir, kinds: { batch: {} }, clientRoute: true, protocols: [jobsProtocol()] })
const worker = createJobWorker({ kind: 'batch', connection: process.env.REDIS_URL, storage: new DiskStorage(dir) }, async (ctx) => {
  for (let i = 1; i <= 3; i++) await ctx.report(i, 3)
  return { ok: true }
})
await app.listen({ port: 0, host: '127.0.0.1' })
const base = 'http://127.0.0.1:' + app.server.address().port
try {
  const health = await (await fetch(base + '/job-progress/health')).json()
  if (health.status !== 'ok') throw new Error('health: ' + JSON.stringify(health))
  const form = new FormData()
  form.append('file', new Blob(['a\\nb\\nc\\n'], { type: 'text/plain' }), 'rows.txt')
  const up = await fetch(base + '/batch/upload', { method: 'POST', body: form })
  const body = await up.json()
  if (up.status !== 202) throw new Error('upload: ' + up.status + ' ' + JSON.stringify(body))
  const cookie = up.headers.get('set-cookie').split(';')[0]
  let status
  for (let i = 0; i < 100; i++) {
    status = await (await fetch(base + body.status_url, { headers: { cookie } })).json()
    if (status.status === 'complete' || status.status === 'failed') break
    await new Promise(resolve => setTimeout(resolve, 100))
  }
  if (status.status !== 'complete' || status.processed !== 3) throw new Error('status: ' + JSON.stringify(status))
  // The client as a page without a bundler gets it: one ES module from the client route.
  const client = await fetch(base + '/job-progress/client.js')
  if (!client.headers.get('content-type').startsWith('text/javascript')) throw new Error('client route: ' + client.headers.get('content-type'))
  writeFileSync(dir + '/client-route.mjs', await client.text())
  const mod = await import(dir + '/client-route.mjs')
  if (typeof mod.JobProgressClient !== 'function') throw new Error('the client route exports no JobProgressClient')
  if (!(new errors.JobNotFoundError() instanceof errors.JobNotFoundError)) throw new Error('errors')
  console.log('job ' + body.job_id + ' complete (3/3), client route imported')
} finally {
  await worker.close()
  await app.close()
}
`)
  await step('ESM JavaScript app: register, upload, job to its end, the client route imported', async () => {
    const dir = mkdtempSync(join(temp, 'uploads-'))
    return run(process.execPath, ['esm.mjs', dir], { cwd: app, env, timeout: 60_000 }).trim()
  })

  writeFileSync(join(app, 'cjs.cjs'), `
const Fastify = require('fastify')
const { jobProgress, errors } = require('fastify-job-progress')
const plugin = require('fastify-job-progress').default
if (plugin !== jobProgress) throw new Error('default and named export differ')
async function main () {
  const app = Fastify()
  await app.register(jobProgress, { connection: process.env.REDIS_URL, kinds: { batch: {} } })
  const res = await app.inject('/job-progress/health')
  await app.close()
  if (res.statusCode !== 200) throw new Error('health: ' + res.statusCode)
  const taken = Fastify()
  taken.get('/job-progress/health', async () => 'mine')
  const err = await taken.register(jobProgress, { connection: process.env.REDIS_URL, kinds: { batch: {} } }).ready().then(() => null, e => e)
  await taken.close().catch(() => {})
  if (!(err instanceof errors.RouteTakenError)) throw new Error('expected RouteTakenError, got ' + err)
  console.log('registered, /job-progress/health 200, RouteTakenError instanceof')
}
main().catch(err => { console.error(err); process.exit(1) })
`)
  await step('CommonJS app: require, register, health, errors by instanceof', async () => run(process.execPath, ['cjs.cjs'], { cwd: app, env, timeout: 60_000 }).trim())

  writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { strict: true, module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', noEmit: true, skipLibCheck: false, lib: ['es2022', 'dom'], types: ['node'] },
    files: ['app.ts', 'page.ts', 'shims.d.ts']
  }, null, 2))
  // ioredis's declarations import redis-errors, which ships none: a strict app without skipLibCheck
  // declares it, as it would have to for ioredis alone.
  writeFileSync(join(app, 'shims.d.ts'), "declare module 'redis-errors'\n")
  writeFileSync(join(app, 'app.ts'), `
import Fastify from 'fastify'
import jobProgress, { createJobWorker, errors, type JobProgressOptions, type Snapshot } from 'fastify-job-progress'
const options: JobProgressOptions = { kinds: { batch: { accept: ['.csv'] } }, routePrefix: '/ops', ssePath: false, myJobs: { path: false }, health: { livePath: '/live' } }
const app = Fastify()
await app.register(jobProgress, options)
const snapshot: Snapshot | null = await app.jobProgress.getJob('batch', 'x')
const err: Error = new errors.RouteTakenError('GET', '/x', 'set \`ssePath\`')
createJobWorker({ kind: 'batch' }, async (ctx) => { await ctx.report(1, 1); return { done: true } })
export { snapshot, err }
`)
  writeFileSync(join(app, 'page.ts'), `
import { JobProgressClient, JobFailedError } from 'fastify-job-progress/client'
const client = new JobProgressClient({ ssePath: '/job-progress/events' })
export async function watch (file: File): Promise<unknown> {
  const job = await client.upload('batch', file)
  try {
    return (await job.watch().done).result
  } catch (err) {
    if (err instanceof JobFailedError) return err.cancelled
    throw err
  }
}
`)
  await step('TypeScript app, strict, nodenext resolution: the plugin, its options and errors, the client', async () => {
    run(process.execPath, [join(app, 'node_modules/typescript/bin/tsc'), '-p', '.'], { cwd: app })
    return 'tsc --noEmit: no errors (skipLibCheck off)'
  })

  writeFileSync(join(app, 'browser.mjs'), 'import { JobProgressClient } from \'fastify-job-progress/client\'\nglobalThis.made = typeof JobProgressClient\n')
  await step('browser bundle (esbuild, platform browser) of fastify-job-progress/client', async () => {
    run(join(app, 'node_modules/.bin/esbuild'), ['browser.mjs', '--bundle', '--platform=browser', '--format=esm', '--minify', '--outfile=bundle.js'], { cwd: app })
    const bundle = readFileSync(join(app, 'bundle.js'), 'utf8')
    if (/from\s*["']node:|require\(["']/.test(bundle)) throw new Error('the bundle imports Node modules')
    run(process.execPath, ['-e', 'import("./bundle.js").then(() => { if (globalThis.made !== "function") process.exit(1) })'], { cwd: app })
    return `${(Buffer.byteLength(bundle) / 1024).toFixed(1)} KiB minified, no Node imports`
  })
} finally {
  for (const child of children) child.kill('SIGTERM')
  rmSync(temp, { recursive: true, force: true })
}

const failed = results.filter(r => !r.ok)
console.log(`\n${results.length - failed.length}/${results.length} passed in ${((Date.now() - started) / 1000).toFixed(1)} s; ${existsSync(temp) ? 'temp left at ' + temp : 'temp directory removed'}`)
process.exit(failed.length === 0 ? 0 : 1)
