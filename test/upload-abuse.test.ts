import t from 'tap'
import { connect as netConnect, type Socket } from 'node:net'
import { eventually, filesIn, redisFor, startApp } from './helpers/index'
import { launchChromium } from './helpers/browser'

// Uploads that try to hold the server: a trickle below the minimum data rate, malformed bodies,
// and refused uploads whose client is still sending a large body.

const BOUNDARY = 'jp-abuse-boundary-7'
const FILE_HEAD = `--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="records.txt"\r\nContent-Type: text/plain\r\n\r\n`

interface RawAnswer { status: number, body: any, at: number }

/**
 * A raw HTTP/1.1 upload on its own socket: the head and `first` are written at once, the rest
 * by the caller. Resolves with the answer once the server closes or a complete JSON body came.
 */
function rawUpload (port: number, path: string, contentLength: number, first: string): { socket: Socket, answer: Promise<RawAnswer> } {
  const socket = netConnect(port, '127.0.0.1')
  socket.write(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=${BOUNDARY}\r\nContent-Length: ${contentLength}\r\n\r\n${first}`)
  const answer = new Promise<RawAnswer>((resolve) => {
    let text = ''
    const done = (): void => {
      const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0)
      let body: unknown = null
      try { body = JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4)) } catch {}
      resolve({ status, body, at: Date.now() })
    }
    socket.on('data', (chunk: Buffer) => {
      text += chunk.toString()
      const length = /content-length: (\d+)/i.exec(text)
      const head = text.indexOf('\r\n\r\n')
      if (length !== null && head >= 0 && Buffer.byteLength(text.slice(head + 4)) >= Number(length[1])) done()
    })
    socket.on('close', done)
    socket.on('error', () => {})
  })
  return { socket, answer }
}

t.test('50 uploads trickling 1 byte per 100 ms all get 408 within the rate window, and leave no partial file', async (t) => {
  const redis = await redisFor(t)
  const WINDOW = 1_000
  const app = await startApp(t, redis, { uploads: { minRateWindowMs: WINDOW } })
  const port = Number(new URL(app.url).port)
  const started = Date.now()
  const uploads = Array.from({ length: 50 }, () => {
    const { socket, answer } = rawUpload(port, '/batch/upload', 100_000, FILE_HEAD)
    const timer = setInterval(() => { if (!socket.destroyed) socket.write('x') }, 100)
    t.teardown(() => { clearInterval(timer); socket.destroy() })
    return answer.finally(() => clearInterval(timer))
  })
  const answers = await Promise.all(uploads)
  const slowest = Math.max(...answers.map(a => a.at - started))
  t.same(answers.map(a => a.status), answers.map(() => 408), 'every trickle is answered 408')
  t.ok(answers.every(a => a.body?.code === 'FST_JP_UPLOAD_TOO_SLOW'), 'with its own code')
  t.match(answers[0].body.message, /less than 1024 bytes per second over 1000 ms/)
  t.ok(slowest < 2 * WINDOW + 1_000, `all answered within ${slowest} ms (bound: two windows and a second)`)
  t.same((await filesIn(app.uploadDir)).filter(name => name.endsWith('.part')), [], 'no partial file left')
})

t.test('malformed multipart bodies are 400 with the parser\'s reason', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis)
  const port = Number(new URL(app.url).port)
  const cases: Array<[string, string]> = [
    ['no final boundary', `${FILE_HEAD}item-1\nitem-2\n`],
    ['no final boundary, no line end', `${FILE_HEAD}item-1`],
    ['a part that ends inside its headers', `--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Ty`],
    ['random bytes', 'ab\u0000cd\r\n--\r\nxyz']
  ]
  for (const [name, body] of cases) {
    const { socket, answer } = rawUpload(port, '/batch/upload', Buffer.byteLength(body), body)
    t.teardown(() => socket.destroy())
    const got = await answer
    t.equal(got.status, 400, `${name}: 400`)
    t.equal(got.body?.code, 'FST_JP_MALFORMED_MULTIPART', `${name}: its code`)
    t.ok(typeof got.body?.message === 'string' && got.body.message.length > 'Malformed multipart/form-data body: '.length, `${name}: a message (${String(got.body?.message)})`)
  }
  // The partial file of a body that broke off is removed before its 400 or just after (a fresh
  // container once listed one at the answer): nothing may stay.
  t.ok(await eventually(async () => (await filesIn(app.uploadDir)).length === 0, 5_000), 'nothing stored')
})

const FIVE_MIB = 5 * 1024 * 1024

t.test('a refused 5 MiB upload is answered so that Node\'s fetch reads the answer', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, {
    getOwner: (request) => request.headers['x-user'] as string | undefined ?? null,
    kinds: { batch: { accept: ['text/csv'] }, dataset: { maxFileSize: 1024 * 1024 } }
  })
  const send = async (path: string, type: string, headers: Record<string, string>): Promise<{ status: number, body: any }> => {
    const form = new FormData()
    form.append('file', new Blob([Buffer.alloc(FIVE_MIB, 'a')], { type }), 'big.bin')
    const res = await fetch(`${app.url}${path}`, { method: 'POST', body: form, headers })
    return { status: res.status, body: await res.json() }
  }
  const unsupported = await send('/batch/upload', 'application/pdf', { 'x-user': 'alice' })
  t.equal(unsupported.status, 415)
  t.equal(unsupported.body.code, 'FST_JP_UNSUPPORTED_FILE_TYPE')
  t.match(unsupported.body.message, /accepted: text\/csv/, 'the answer names the accepted types')
  const large = await send('/dataset/upload', 'text/plain', { 'x-user': 'alice' })
  t.equal(large.status, 413)
  t.equal(large.body.code, 'FST_JP_FILE_TOO_LARGE')
  const anonymous = await send('/batch/upload', 'text/csv', {})
  t.equal(anonymous.status, 401)
  t.equal(anonymous.body.code, 'FST_JP_UNAUTHORIZED')
  t.same(await filesIn(app.uploadDir), [], 'nothing stored')
})

t.test('a refused upload beyond the drain bound is still answered, and its connection closed', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { accept: ['text/csv'] } }, uploads: { refusedDrainBytes: 64 * 1024 } })
  const port = Number(new URL(app.url).port)
  const { socket, answer } = rawUpload(port, '/batch/upload', 100 * 1024 * 1024, `--${BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.pdf"\r\nContent-Type: application/pdf\r\n\r\n`)
  t.teardown(() => socket.destroy())
  const chunk = Buffer.alloc(64 * 1024, 'a')
  // Writes until the socket's buffer is full, again on each 'drain', as a client that keeps sending.
  const pump = (): void => {
    let more = true
    while (more && !socket.destroyed) more = socket.write(chunk)
  }
  socket.on('drain', pump)
  pump()
  const got = await answer
  t.equal(got.status, 415, 'answered after at most the bound')
  await new Promise<void>(resolve => { if (socket.destroyed) resolve(); else socket.once('close', () => resolve()) })
  t.pass('the server closed the connection instead of reading 100 MiB')
})

t.test('Chromium reads the 415 of a refused 5 MiB upload', async (t) => {
  const redis = await redisFor(t)
  const app = await startApp(t, redis, { kinds: { batch: { accept: ['text/csv'] } } })
  const browser = await launchChromium(t)
  const page = await browser.newPage()
  await page.goto(`${app.url}/job-progress/health`)
  const got = await page.evaluate(async (size) => {
    const form = new FormData()
    form.append('file', new Blob([new Uint8Array(size).fill(97)], { type: 'application/pdf' }), 'big.pdf')
    try {
      const res = await fetch('/batch/upload', { method: 'POST', body: form })
      return { status: res.status, body: await res.json() }
    } catch (err) {
      return { status: 0, body: String(err) }
    }
  }, FIVE_MIB)
  t.equal(got.status, 415, `the page got the answer, not a network error (${JSON.stringify(got.body).slice(0, 80)})`)
  t.equal(got.body.code, 'FST_JP_UNSUPPORTED_FILE_TYPE')
})
