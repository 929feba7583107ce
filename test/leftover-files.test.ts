import t from 'tap'
import { spawn } from 'node:child_process'
import { once } from 'node:events'
import { readdir, rm, writeFile } from 'node:fs/promises'
import { connect as netConnect } from 'node:net'
import { join } from 'node:path'
import { connect, eventually, filesIn, lines, redisFor, startApp, tempDir, upload } from './helpers/index'
import { LOAD_TS } from './helpers/cluster'

// What an instance leaves on disk when it is killed or its jobs are lost: its own partial files
// are removed when it starts again under its id, and a lost job's upload when the loss is found.

const BOUNDARY = 'jp-leftover-boundary'

t.test('an instance restarted under its id removes the partial files its killed run left, and only those', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t, 'jp-leftover-')
  const scripts = await tempDir(t, 'jp-leftover-child-')
  const child = join(scripts, 'instance.ts')
  await writeFile(child, `
import Fastify from ${JSON.stringify(require.resolve('fastify'))}
import jobProgress from ${JSON.stringify(join(__dirname, '..', 'lib', 'index'))}
void (async () => {
  const app = Fastify()
  await app.register(jobProgress, { connection: process.argv[2], uploadDir: process.argv[3], instanceId: 'leftover-a', kinds: { batch: {} }, session: { secret: 'a-test-secret-of-enough-length' }, uploads: { minBytesPerSecond: 0 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  process.stdout.write('port ' + (app.server.address() as { port: number }).port + '\\n')
})()
`)
  const proc = spawn(process.execPath, [...LOAD_TS, child, redis.url, uploadDir], { stdio: ['ignore', 'pipe', 'inherit'], cwd: join(__dirname, '..') })
  t.teardown(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
  let out = ''
  proc.stdout.on('data', (chunk: Buffer) => { out += chunk.toString() })
  t.ok(await eventually(() => /port \d+/.test(out), 20_000), 'the instance started')
  const port = Number(/port (\d+)/.exec(out)?.[1])

  // An upload that is still sending when the instance is killed.
  const socket = netConnect(port, '127.0.0.1')
  t.teardown(() => socket.destroy())
  socket.on('error', () => {})
  socket.write(`POST /batch/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=${BOUNDARY}\r\nContent-Length: 100000\r\n\r\n--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain\r\n\r\nitem-1\n`)
  t.ok(await eventually(async () => (await readdir(uploadDir)).some(name => name.endsWith('.part')), 10_000), 'a partial file is being written')
  proc.kill('SIGKILL')
  await once(proc, 'exit')
  const own = (await readdir(uploadDir)).filter(name => name.endsWith('.part'))
  t.equal(own.length, 1)
  t.match(own[0], /^batch-[0-9a-f-]{36}\.leftover-a\.part$/, 'the partial file carries its writer')
  // Another instance's partial file, which may still be writing: not ours to remove.
  const foreign = 'batch-00000000-0000-4000-8000-000000000001.leftover-b.part'
  await writeFile(join(uploadDir, foreign), 'item-1\n')

  await startApp(t, redis, { uploadDir, instanceId: 'leftover-a' })
  t.same(await filesIn(uploadDir), [foreign], 'once started, its own partial file is gone; the other instance\'s is kept')
  await rm(join(uploadDir, foreign), { force: true })
})

t.test('the upload of a job lost with Redis is removed when a watcher finds it lost', async (t) => {
  const redis = await redisFor(t)
  const { url, uploadDir } = await startApp(t, redis, { files: { orphanAgeMs: 3_600_000, sweepIntervalMs: 3_600_000 } })
  const up = await upload(`${url}/batch/upload`, lines(3))
  t.equal(up.status, 202)
  t.equal((await filesIn(uploadDir)).length, 1, 'the upload is stored (no worker: the job waits)')
  const client = connect(t, up.body.ws_url, { cookie: up.cookie })
  await client.waitFor(() => true)

  await redis.down()
  for (const entry of await readdir(redis.dir)) await rm(join(redis.dir, entry), { recursive: true, force: true })
  await redis.up()
  const final = await client.waitFor(m => m.status === 'failed', 15_000)
  t.equal(final.error, 'job_lost')
  t.ok(await eventually(async () => (await filesIn(uploadDir)).length === 0, 5_000), 'its upload is removed, not left for the hour-old sweep')
})
