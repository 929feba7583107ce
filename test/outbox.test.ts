import t from 'tap'
import { once } from 'node:events'
import WebSocket, { WebSocketServer } from 'ws'
import { Outbox } from '../lib/session/outbox'
import { WebSocketTransport } from '../lib/transports/websocket'

/** A real server socket whose client has stopped reading. */
async function stalledPair (t: { teardown: (fn: () => unknown) => void }) {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' })
  await once(wss, 'listening')
  const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as { port: number }).port}`)
  const [server] = await once(wss, 'connection') as [WebSocket]
  await once(client, 'open')
  const received: string[] = []
  client.on('message', (data) => received.push(data.toString().slice(0, 20)))
  t.teardown(async () => {
    client.terminate()
    await new Promise(resolve => wss.close(resolve))
  })
  ;(client as unknown as { _socket: { pause: () => void } })._socket.pause()
  return { server, client, received }
}

t.test('a waiting progress message is replaced by the newer one, which goes behind later control messages', async (t) => {
  const { server, client, received } = await stalledPair(t)
  const outbox = new Outbox(new WebSocketTransport(server))
  // More than the kernel takes from a reader that has stopped: everything after it waits.
  outbox.send('big:' + 'x'.repeat(16 * 1024 * 1024))
  outbox.send('progress-1', 'job')
  outbox.send('control')
  outbox.send('progress-2', 'job')
  t.equal(outbox.conflated, 1, 'progress-1 was replaced')
  outbox.send('final-b', 'other', true)
  outbox.send('progress-b', 'other')
  t.equal(outbox.conflated, 1, 'a final message is never replaced')
  t.ok(outbox.stalledFor(Date.now() + 10) > 0, 'the stalled send is measured')

  ;(client as unknown as { _socket: { resume: () => void } })._socket.resume()
  while (received.length < 5) await once(client, 'message')
  t.same(received.map(r => r.startsWith('big:') ? 'big' : r), ['big', 'control', 'progress-2', 'final-b', 'progress-b'],
    'the newer progress went behind the control message queued before it')
  t.equal(outbox.stalledFor(Date.now()), 0)
})

t.test('closeWhenFlushed closes only after what was queued before it', async (t) => {
  const { server, client, received } = await stalledPair(t)
  const outbox = new Outbox(new WebSocketTransport(server))
  outbox.send('big:' + 'x'.repeat(16 * 1024 * 1024))
  outbox.send('final', 'job', true)
  outbox.closeWhenFlushed(1000, 'job finished')
  outbox.send('too-late')
  ;(client as unknown as { _socket: { resume: () => void } })._socket.resume()
  const [code, reason] = await once(client, 'close')
  t.equal(code, 1000)
  t.equal(String(reason), 'job finished')
  t.same(received.map(r => r.startsWith('big:') ? 'big' : r), ['big', 'final'])
})

t.test('unread bytes over maxBytes: the owner told once, the queue let go, nothing more queued', async (t) => {
  const { server } = await stalledPair(t)
  let overflows = 0
  // The message being flushed does not count, though it is far over the limit: what waits behind it does.
  const outbox = new Outbox(new WebSocketTransport(server), { maxBytes: 1024 * 1024, owner: { overflowed: () => overflows++ } })
  outbox.send('big:' + 'x'.repeat(16 * 1024 * 1024))
  // Replies without a job are never conflated: they are what a client that never reads piles up.
  let sent = 0
  while (sent < 4000) {
    sent++
    outbox.send('{"type":"pong"}'.padEnd(1024))
    if (outbox.queuedBytes === 0 && sent > 1) break
  }
  t.equal(overflows, 1, 'the limit was reached')
  t.ok(sent > 1000, `the limit counts queued replies (${sent} sent before it)`)
  t.equal(outbox.queuedBytes, 0, 'what waited was dropped')
  outbox.send('after')
  t.equal(outbox.queuedBytes, 0, 'nothing is queued after the overflow')
  t.equal(overflows, 1, 'reported once')
})

t.test('a conflated message counts once against the limit', async (t) => {
  const { server } = await stalledPair(t)
  let overflows = 0
  const outbox = new Outbox(new WebSocketTransport(server), { maxBytes: 17 * 1024 * 1024, owner: { overflowed: () => overflows++ } })
  outbox.send('big:' + 'x'.repeat(16 * 1024 * 1024))
  for (let i = 0; i < 1000; i++) outbox.send(`progress-${i}`.padEnd(1024), 'job')
  t.equal(overflows, 0, 'a thousand progress updates of one job hold one slot')
  t.equal(outbox.queuedBytes, 1024)
})
