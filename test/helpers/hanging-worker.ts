// A worker process that takes a job and never finishes it: tests SIGKILL it mid-job.
// Usage: node --require ./test/helpers/register.cjs test/helpers/hanging-worker.ts <redis-url> <upload-dir>
import { createJobWorker, DiskStorage } from '../../lib/index'

const [url, dir] = process.argv.slice(2)
const worker = createJobWorker({
  kind: 'batch',
  connection: url,
  storage: new DiskStorage(dir),
  workerOptions: { lockDuration: 500, stalledInterval: 300, maxStalledCount: 1 }
}, async (ctx) => {
  process.stdout.write(`active ${ctx.job.id as string}\n`)
  await new Promise(() => {})
})
worker.on('error', () => {})
