import t from 'tap'
import type { Page } from 'playwright-core'
import { buildApp } from '../example/app'
import { demoProcessor } from '../example/processor'
import { createJobWorker, DiskStorage } from '../lib/index'
import { gate, redisFor, tempDir } from './helpers/index'
import { launchChromium } from './helpers/browser'

// The example page as a user has it: jobs uploaded, the page reloaded while one runs. The page
// lists the session's jobs again (the client's myJobs), watches the running one again and shows
// its streamed results (watch.stream), from the first, then live, up to its result; the one that
// had ended shows how it ended.

const RECORDS = 60
/** The long job's worker waits after this many results until the page has reloaded, */
const HOLD_AT = 20
/** and after this many until the page has shown them, live. */
const HOLD_AGAIN = 40
const rows = (n: number): string[] => Array.from({ length: n }, (_, i) => `row ${i}`)
const shown = (n: number): string[] => rows(n).map(r => `${r} · ${r.length} chars`)

async function results (page: Page, card: string): Promise<Array<[string | null, string | null]>> {
  return await page.$$eval(`${card} .results li`, items => items.map(li => [li.getAttribute('data-offset'), li.textContent] as [string | null, string | null]))
}
const numbered = (texts: string[]): Array<[string, string]> => texts.map((text, i) => [String(i), text])

t.test('a reload mid-job: the page lists the jobs again, the running one is watched again, its streamed results come back and go on live to its result', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const app = await buildApp({ redisUrl: redis.url, sessionSecret: 'a-browser-test-secret-0123456789', uploadDir, plugin: { throttleMs: 0 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const origin = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`

  // The example's own processor, 20 ms a record; its report of record HOLD_AT waits (its result
  // is written by then) until the test lets it go, so the reload comes mid-job on any machine.
  const held = gate()
  const heldAgain = gate()
  let holding = false
  const demo = demoProcessor(20)
  const worker = createJobWorker({ kind: 'batch', connection: redis.url, storage: new DiskStorage(uploadDir), workerOptions: { concurrency: 2 } }, async (ctx) => await demo({
    ...ctx,
    async report (processed, total, details) {
      if (processed === HOLD_AT && total === RECORDS) {
        holding = true
        await held.promise
      }
      if (processed === HOLD_AGAIN && total === RECORDS) await heldAgain.promise
      await ctx.report(processed, total, details)
    }
  }))
  worker.on('error', () => {})
  t.teardown(async () => {
    held.open()
    heldAgain.open()
    await worker.close()
  })

  const browser = await launchChromium(t)
  const page = await browser.newPage()
  const sockets: string[] = []
  page.on('websocket', ws => sockets.push(new URL(ws.url()).pathname))
  await page.goto(origin + '/')
  t.equal(await page.textContent('#connection'), 'Idle', 'a first visit has no jobs to list: no connection')
  await page.setInputFiles('#file', [
    { name: 'short.txt', mimeType: 'text/plain', buffer: Buffer.from(rows(3).join('\n')) },
    { name: 'long.txt', mimeType: 'text/plain', buffer: Buffer.from(rows(RECORDS).join('\n')) }
  ])
  const byName = (name: string): string => `article.job:has(.name:text-is("${name}"))`
  await page.waitForSelector(`${byName('short.txt')}[data-status=succeeded]`, { timeout: 20_000 })
  await page.waitForSelector(`${byName('long.txt')} .results li[data-offset="${HOLD_AT - 1}"]`, { timeout: 20_000 })
  t.ok(holding, 'the long job is held mid-way')
  t.equal(await page.getAttribute(byName('long.txt'), 'data-status'), 'running')
  t.same(await results(page, byName('long.txt')), numbered(shown(HOLD_AT)), 'its results shown live, in order, while it runs')
  t.same(await results(page, byName('short.txt')), numbered(shown(3)))
  const longId = await page.getAttribute(byName('long.txt'), 'data-job-id') as string
  const shortId = await page.getAttribute(byName('short.txt'), 'data-job-id') as string
  t.ok(longId !== null && shortId !== null)
  t.same(sockets, ['/api/v1/ws/jobs'], 'two jobs and the list: one WebSocket')

  await page.reload()
  const long = `article.job[data-job-id="${longId}"]`
  const short = `article.job[data-job-id="${shortId}"]`
  // The running job: listed again, under its file's name, its results caught up from the first.
  await page.waitForSelector(`${long} .results li[data-offset="${HOLD_AT - 1}"]`, { timeout: 20_000 })
  t.equal(await page.$eval(`${long} .name`, name => name.firstChild?.nodeValue), 'long.txt', 'listed again under its name')
  t.equal(await page.getAttribute(long, 'data-status'), 'running', 'running, and still held')
  t.same(await results(page, long), numbered(shown(HOLD_AT)), 'the results so far, each once, in order')
  // The one that had ended: how it ended, its results and log lines, from the routes.
  await page.waitForSelector(`${short} .outcome:text-is("Done · records: 3, file: short.txt")`, { timeout: 20_000 })
  t.equal(await page.getAttribute(short, 'data-status'), 'succeeded')
  t.equal(await page.textContent(`${short} .info`), '3 of 3 records')
  await page.waitForSelector(`${short} .results li[data-offset="2"]`, { timeout: 10_000 })
  t.same(await results(page, short), numbered(shown(3)))
  await page.waitForSelector(`${short} .logs li[data-offset="1"]`, { timeout: 10_000 })
  t.same(await page.$$eval(`${short} .logs li`, items => items.map(li => li.textContent)), ['counted 3 records in short.txt', 'processed 3 of 3'])

  // Let the worker go on: the next results arrive live while it runs, then the rest to the end.
  held.open()
  await page.waitForSelector(`${long} .results li[data-offset="${HOLD_AGAIN - 1}"]`, { timeout: 20_000 })
  t.equal(await page.getAttribute(long, 'data-status'), 'running', 'results streamed live after the reload')
  t.same(await results(page, long), numbered(shown(HOLD_AGAIN)))
  heldAgain.open()
  await page.waitForSelector(`${long}[data-status=succeeded]`, { timeout: 20_000 })
  await page.waitForSelector(`${long} .outcome:text-is("Done · records: ${RECORDS}, file: long.txt")`, { timeout: 10_000 })
  await page.waitForSelector(`${long} .results li[data-offset="${RECORDS - 1}"]`, { timeout: 10_000 })
  t.same(await results(page, long), numbered(shown(RECORDS)), 'every result once, in order, across the reload')
  t.equal(await page.textContent(`${long} .info`), `${RECORDS} of ${RECORDS} records`)
  t.equal(await page.$$eval('article.job', cards => cards.length), 2, 'each job listed once')
  t.equal(await page.getAttribute('#connection', 'data-state'), 'live', 'the page follows its list of jobs')
  t.same(sockets, ['/api/v1/ws/jobs', '/api/v1/ws/jobs'], 'one WebSocket per page load')
})
