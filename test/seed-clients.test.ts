import t from 'tap'
import { spawn, spawnSync } from 'node:child_process'
import { join } from 'node:path'
import { buildApp } from '../example/app'
import { lines, redisFor, startWorker, tempDir, upload } from './helpers/index'

// The seeds' own client code, run as separate processes against the example app over real
// sockets: what a user copies from those documents works here unchanged (but for URL, job id and
// credentials).

const PYTHON = '/usr/bin/python3'
const CLIENTS = join(__dirname, 'clients')

interface Teardown { teardown: (fn: () => unknown) => void }

async function startExample (t: Teardown) {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-uploads-')
  const app = await buildApp({
    redisUrl: redis.url,
    sessionSecret: 'a-test-secret-of-enough-length',
    uploadDir,
    apiKeys: 'key-alice:alice,key-bob:bob',
    plugin: { reconcileIntervalMs: 500, throttleMs: 0 }
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const { port } = app.server.address() as { port: number }
  return { redis, uploadDir, url: `http://127.0.0.1:${port}`, ws: `ws://127.0.0.1:${port}` }
}

interface Run {
  lines: string[]
  stderr: () => string
  /** Resolves with the first output line matching `re`. */
  line: (re: RegExp) => Promise<string>
  exited: Promise<number | null>
}

/** Runs a client process, killed at teardown and after `timeoutMs`. */
function run (t: Teardown, command: string, args: string[], timeoutMs = 20_000): Run {
  const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  const out: string[] = []
  let partial = ''
  let err = ''
  const waiters: Array<{ re: RegExp, resolve: (line: string) => void }> = []
  child.stdout.on('data', (chunk: Buffer) => {
    const parts = (partial + chunk.toString()).split('\n')
    partial = parts.pop() as string
    for (const line of parts) {
      out.push(line)
      for (const w of waiters.filter(w => w.re.test(line))) {
        waiters.splice(waiters.indexOf(w), 1)
        w.resolve(line)
      }
    }
  })
  child.stderr.on('data', (chunk: Buffer) => { err += chunk.toString() })
  const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
  const exited = new Promise<number | null>(resolve => child.once('close', (code) => {
    clearTimeout(timer)
    resolve(code)
  }))
  t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL') })
  return {
    lines: out,
    stderr: () => err,
    exited,
    line: async (re) => {
      const seen = out.find(l => re.test(l))
      if (seen !== undefined) return seen
      return await Promise.race([
        new Promise<string>(resolve => waiters.push({ re, resolve })),
        exited.then(code => { throw new Error(`the client exited (${code}) before printing ${re}; stdout: ${out.join(' | ')}; stderr: ${err}`) })
      ])
    }
  }
}

/** The Python clients need the `websockets` package for /usr/bin/python3: say so plainly when it is missing. */
function pythonReady (t: { fail: (message: string) => void }): boolean {
  const probe = spawnSync(PYTHON, ['-c', 'import websockets'], { encoding: 'utf8' })
  if (probe.status === 0) return true
  t.fail(`${PYTHON} cannot import websockets (${probe.error?.message ?? probe.stderr.trim().split('\n').at(-1)}). ` +
    'Install it: apt-get install python3-websockets (the CI script does).')
  return false
}

const progressLines = (run: Run): Array<[number, number, number]> =>
  run.lines.map(l => /^Progress: ([\d.]+)% \((\d+)\/(\d+)\)$/.exec(l)).filter(m => m !== null).map(m => [Number(m[1]), Number(m[2]), Number(m[3])])

t.test('seed 000, Python monitor_batch: progress lines, then "Job complete"', async (t) => {
  if (!pythonReady(t)) return
  const { url, ws, redis, uploadDir } = await startExample(t)
  const up = await upload(`${url}/batch/upload`, lines(5))
  const client = run(t, PYTHON, ['-u', join(CLIENTS, 'seed000.py'), ws, up.body.job_id, up.cookie as string])
  await client.line(/^Progress: 0% \(0\/0\)$/)
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 30 })
  t.equal(await client.exited, 0, client.stderr())
  t.equal(client.lines[0], 'Connected to WebSocket')
  t.equal(client.lines.at(-1), 'Job complete')
  const progress = progressLines(client)
  t.ok(progress.length >= 3, `several progress lines (${progress.length})`)
  t.same(progress.at(-1), [100, 5, 5])
  t.same(progress.map(p => p[1]), progress.map(p => p[1]).sort((a, b) => a - b), 'processed never goes back')
  t.ok(client.lines.includes('ETA: 0 seconds'))
})

t.test('seed 000, JavaScript client with ws: progress lines, then "Job complete!"', async (t) => {
  const { url, ws, redis, uploadDir } = await startExample(t)
  const up = await upload(`${url}/batch/upload`, lines(5))
  const client = run(t, process.execPath, [join(CLIENTS, 'seed000.js'), ws, up.body.job_id, up.cookie as string])
  await client.line(/^Progress: 0% \(0\/0\)$/)
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 30 })
  t.equal(await client.exited, 0, client.stderr())
  t.equal(client.lines[0], 'WebSocket connected')
  t.same(client.lines.slice(-2), ['Job complete!', 'WebSocket closed'])
  const progress = progressLines(client)
  t.ok(progress.length >= 3, `several progress lines (${progress.length})`)
  t.same(progress.at(-1), [100, 5, 5])
  t.equal(client.stderr(), '', 'no errors')
})

t.test('seed 002, Python listen_for_updates: connected, subscribe, updates, result', async (t) => {
  if (!pythonReady(t)) return
  const { url, ws, redis, uploadDir } = await startExample(t)
  const up = await upload(`${url}/batch/upload`, lines(5), { headers: { authorization: 'Bearer key-alice' } })
  const jobId = up.body.job_id
  const client = run(t, PYTHON, ['-u', join(CLIENTS, 'seed002.py'), ws, 'key-alice', jobId])
  await client.line(new RegExp(`^Job ${jobId}: queued$`))
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 30 })
  t.equal(await client.exited, 0, client.stderr())
  t.match(client.lines[0], /^Connected: \{'type': 'connected', 'message': 'WebSocket connection established', 'ts': \d+\}$/)
  t.ok(client.lines.includes(`Job ${jobId}: running`))
  t.same(client.lines.slice(-3), [`Job ${jobId}: succeeded`, "Result: {'lines': 5}", 'Returned: {"lines": 5}'])
})

t.test('seed 002, Python listen_for_updates: a failed job raises with its error; another key\'s job prints the error', async (t) => {
  if (!pythonReady(t)) return
  const { url, ws, redis, uploadDir } = await startExample(t)
  const up = await upload(`${url}/batch/upload`, lines(3, 2), { headers: { authorization: 'Bearer key-alice' } })
  const client = run(t, PYTHON, ['-u', join(CLIENTS, 'seed002.py'), ws, 'key-alice', up.body.job_id])
  await client.line(/: queued$/)
  startWorker(t, redis, 'batch', uploadDir)
  t.equal(await client.exited, 1)
  t.match(client.stderr(), /Exception: Job failed: record on line 2 is FAIL/)

  const foreign = run(t, PYTHON, ['-u', join(CLIENTS, 'seed002.py'), ws, 'key-bob', up.body.job_id])
  t.equal(await foreign.line(/^Error: /), `Error: Job not found or access denied: ${up.body.job_id}`)
})

t.test('seed 001, the complete example class with ws at /ws: progress, "Scan completed!", closed cleanly with 1000', async (t) => {
  const { url, redis, uploadDir } = await startExample(t)
  const up = await upload(`${url}/batch/upload`, lines(5))
  const client = run(t, process.execPath, [join(CLIENTS, 'seed001.js'), url, up.body.job_id, up.cookie as string])
  await client.line(/^Progress: 0%$/)
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 30 })
  t.equal(await client.exited, 0, client.stderr())
  t.same(client.lines.slice(0, 2), ['Connected to WebSocket', `Subscribed to scan: ${up.body.job_id}`])
  t.same(client.lines.slice(-3), ['Progress: 100%', 'Scan completed!', 'Connection closed cleanly: 1000'])
  t.ok(client.lines.filter(l => l.startsWith('Progress: ')).length >= 3)
})
