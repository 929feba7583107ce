import t from 'tap'
import { buildApp } from '../example/app'
import { demoProcessor } from '../example/processor'
import { createJobWorker, DiskStorage } from '../lib/index'
import { redisFor, tempDir } from './helpers/index'
import { launchChromium } from './helpers/browser'

t.test("the example page shows the demo worker's stage and message live, next to the counts, and its log lines", async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const app = await buildApp({ redisUrl: redis.url, sessionSecret: 'a-browser-test-secret-0123456789', uploadDir, plugin: { throttleMs: 0 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const origin = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir) }, demoProcessor(30))
  worker.on('error', () => {})
  t.teardown(async () => await worker.close())

  const browser = await launchChromium(t)
  const page = await browser.newPage()
  await page.goto(origin + '/')
  await page.setInputFiles('#file', [{ name: 'long.txt', mimeType: 'text/plain', buffer: Buffer.from(Array.from({ length: 100 }, (_, i) => `r${i}`).join('\n')) }])
  const card = 'article.job:has(.name:text-is("long.txt"))'
  await page.waitForSelector(`${card}[data-stage=processing]`, { timeout: 20_000 })
  t.match(await page.textContent(`${card} .info`), /^processing: record \d+ of 100: r\d+ · \d+ of 100 records/, 'stage and message shown while it runs')
  // Its log lines too, live, under the card, each with its offset.
  await page.waitForSelector(`${card} .logs li[data-offset="1"]`, { timeout: 20_000 })
  t.equal(await page.textContent(`${card} .logs li[data-offset="0"]`), 'counted 100 records in long.txt', 'the first log line, while the job runs')
  t.not(await page.getAttribute(card, 'data-status'), 'succeeded', 'shown before the job ended')
  await page.waitForSelector(`${card}[data-status=succeeded]`, { timeout: 20_000 })
  await page.waitForSelector(`${card} .logs li[data-offset="10"]`, { timeout: 10_000 })
  t.same(await page.$$eval(`${card} .logs li`, (items) => items.map(li => [li.getAttribute('data-offset'), li.textContent])),
    ['counted 100 records in long.txt', ...Array.from({ length: 10 }, (_, i) => `processed ${(i + 1) * 10} of 100`)].map((line, i) => [String(i), line]), 'every line once, in order')
  t.equal(await page.textContent(`${card} .info`), '100 of 100 records')
  // The lines are in the job's log list, where the logs route reads them.
  const jobId = await page.getAttribute(card, 'data-job-id') as string
  const queue = app.jobProgress.queues.get('batch')
  const logs = await queue?.getJobLogs(jobId)
  t.same(logs?.logs, ['counted 100 records in long.txt', ...Array.from({ length: 10 }, (_, i) => `processed ${(i + 1) * 10} of 100`)])
})
