import t from 'tap'
import Fastify from 'fastify'
import { buildApp } from '../example/app'
import { redisFor, startWorker, tempDir } from './helpers/index'
import { launchChromium } from './helpers/browser'

// A real browser: cookies from its own jar (no headers set by hand), SameSite, and the Origin it
// sends on its own. Needs Debian's chromium (.ci/run installs it).

t.test('the example page in a browser: upload, live progress over the session cookie, complete; another site is refused', async (t) => {
  const redis = await redisFor(t)
  const uploadDir = await tempDir(t)
  const app = await buildApp({ redisUrl: redis.url, sessionSecret: 'a-browser-test-secret-0123456789', uploadDir, plugin: { throttleMs: 0 } })
  await app.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await app.close())
  const origin = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
  startWorker(t, redis, 'batch', uploadDir, { delayMs: 30 })

  // Another site on the same host (same site for cookies, another origin): it tries to open the
  // victim's job socket with the victim's cookie riding along.
  const evil = Fastify()
  evil.get('/', async (_req, reply) => await reply.type('text/html').send('<!doctype html><title>other</title>'))
  await evil.listen({ port: 0, host: '127.0.0.1' })
  t.teardown(async () => await evil.close())
  const evilOrigin = `http://127.0.0.1:${(evil.server.address() as { port: number }).port}`

  const browser = await launchChromium(t)
  const context = await browser.newContext()
  const page = await context.newPage()
  const sockets: string[] = []
  page.on('websocket', ws => sockets.push(ws.url()))
  await page.goto(origin + '/')
  t.equal(await page.textContent('#connection'), 'Idle', 'no connection before anything is watched')
  await page.setInputFiles('#file', [
    { name: 'first.txt', mimeType: 'text/plain', buffer: Buffer.from('a\nb\nc\nd\ne\n') },
    { name: 'second.txt', mimeType: 'text/plain', buffer: Buffer.from('a\nb\nFAIL\nd\n') },
    { name: 'third.txt', mimeType: 'text/plain', buffer: Buffer.from(Array.from({ length: 200 }, (_, i) => `r${i}`).join('\n')) }
  ])
  const card = (name: string): string => `article.job:has(.name:text-is("${name}"))`
  await page.waitForSelector(`${card('first.txt')}[data-status=succeeded]`, { timeout: 20_000 })
  t.match(await page.textContent(`${card('first.txt')} .outcome`), 'Done · lines: 5')
  t.equal(await page.textContent(`${card('first.txt')} .info`), '5 of 5 records')
  await page.waitForSelector(`${card('second.txt')}[data-status=failed]`, { timeout: 20_000 })
  t.equal(await page.textContent(`${card('second.txt')} .outcome`), 'Failed: record on line 3 is FAIL')
  // The long one: cancelled while it runs.
  await page.waitForSelector(`${card('third.txt')}[data-status=running]`, { timeout: 20_000 })
  // The status attribute and the counts are drawn in turn: wait for the counts rather than read them at once.
  await page.waitForSelector(`${card('third.txt')} .info:text-matches("^[0-9]+ of 200 records")`, { timeout: 10_000 })
  t.match(await page.textContent(`${card('third.txt')} .info`), /^\d+ of 200 records/)
  t.equal(await page.getAttribute('#connection', 'data-state'), 'live')
  t.equal(await page.textContent('#connection'), 'Live')
  await page.click(`${card('third.txt')} button.cancel`)
  await page.waitForSelector(`${card('third.txt')}[data-status=cancelled]`, { timeout: 20_000 })
  t.equal(await page.textContent(`${card('third.txt')} .outcome`), 'Cancelled.')
  t.same(sockets.map(u => new URL(u).pathname), ['/api/v1/ws/jobs'], 'three jobs, one WebSocket')
  // Every job ended, but the page follows the list of its jobs on that socket: it stays open.
  t.equal(await page.getAttribute('#connection', 'data-state'), 'live', 'the list of jobs keeps the one socket')

  const cookies = await context.cookies(origin)
  const session = cookies.find(c => c.name === 'jp_session')
  t.match(session, { httpOnly: true, sameSite: 'Lax' }, 'the session cookie is HttpOnly and SameSite=Lax')
  const jobId = await page.getAttribute(card('first.txt'), 'data-job-id')
  t.ok(jobId, 'the page saw its job id')

  const served = await fetch(`${origin}/job-progress/client.js`)
  t.equal(served.headers.get('content-type'), 'text/javascript; charset=utf-8')
  t.equal(served.headers.get('cache-control'), 'public, max-age=3600')
  const again = await fetch(`${origin}/job-progress/client.js`, { headers: { 'if-none-match': served.headers.get('etag') as string } })
  t.equal(again.status, 304, 'the module is served with an ETag')

  const other = await context.newPage()
  await other.goto(evilOrigin + '/')
  const result = await other.evaluate(async (url) => await new Promise<{ code: number, reason: string, messages: number }>(resolve => {
    let messages = 0
    const ws = new WebSocket(url)
    ws.onmessage = () => { messages++ }
    ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, messages })
  }), origin.replace('http', 'ws') + '/ws/batch/' + String(jobId))
  t.same(result, { code: 4003, reason: 'origin not allowed', messages: 0 }, 'cross-site WebSocket hijacking is refused before any job data')
})
