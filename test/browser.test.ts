import t from 'tap'
import Fastify from 'fastify'
import { chromium } from 'playwright-core'
import { buildApp } from '../example/app'
import { redisFor, startWorker, tempDir } from './helpers/index'

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

  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'] })
  t.teardown(async () => await browser.close())
  const context = await browser.newContext()
  const page = await context.newPage()
  await page.goto(origin + '/')
  await page.setInputFiles('#file', { name: 'records.txt', mimeType: 'text/plain', buffer: Buffer.from('a\nb\nc\nd\ne\n') })
  await page.click('button[type=submit]')
  await page.waitForFunction(() => document.getElementById('status')?.textContent?.startsWith('complete'), undefined, { timeout: 20_000 })
  t.equal(await page.textContent('#status'), 'complete: 100% (5/5), ETA 0 s')
  const log = (await page.textContent('#log')) ?? ''
  t.ok(log.split('\n').filter(Boolean).length >= 3, 'several progress messages arrived live')

  const cookies = await context.cookies(origin)
  const session = cookies.find(c => c.name === 'jp_session')
  t.match(session, { httpOnly: true, sameSite: 'Lax' }, 'the session cookie is HttpOnly and SameSite=Lax')
  const jobId = /"job_id":"([0-9a-f-]{36})"/.exec(log)?.[1]
  t.ok(jobId, 'the page saw its job id')

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
