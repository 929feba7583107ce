import t from 'tap'
import { once } from 'node:events'
import WebSocket, { WebSocketServer, type ServerOptions } from 'ws'
import { Outbox } from '../lib/session/outbox'
import { WebSocketTransport } from '../lib/transports/websocket'
import type { TransportEvents } from '../lib/session/transport'
import { canWriteFrame, frameOf, frameStats, frameText, framingSupported } from '../lib/transports/ws-frame'

type Teardown = { teardown: (fn: () => unknown) => void }

/** A real server with `n` real clients; their messages are collected as text. */
async function connect (t: Teardown, n: number, opts: ServerOptions = {}, clientOpts: WebSocket.ClientOptions = {}) {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1', ...opts })
  await once(wss, 'listening')
  const port = (wss.address() as { port: number }).port
  const pairs: Array<{ server: WebSocket, client: WebSocket, received: string[] }> = []
  t.teardown(async () => {
    for (const p of pairs) p.client.terminate()
    await new Promise(resolve => wss.close(resolve))
  })
  for (let i = 0; i < n; i++) {
    const client = new WebSocket(`ws://127.0.0.1:${port}`, clientOpts)
    const [server] = await once(wss, 'connection') as [WebSocket]
    await once(client, 'open')
    const received: string[] = []
    client.on('message', (data, isBinary) => received.push(`${isBinary ? 'binary:' : ''}${data.toString()}`))
    pairs.push({ server, client, received })
  }
  return pairs
}

async function until (client: WebSocket, received: string[], n: number): Promise<void> {
  while (received.length < n) await once(client, 'message')
}

t.test('the ws internals the prebuilt frames rely on are still there', async (t) => {
  // If this fails, ws changed Sender.frame, its sender state or its socket field: every socket
  // would silently take the slower ws.send path. Check lib/transports/ws-frame.ts against ws.
  t.ok(framingSupported, 'ws exports Sender.frame')
  const [{ server }] = await connect(t, 1)
  t.ok(canWriteFrame(server), 'an open socket without extensions takes prebuilt frames')
  const internals = server as unknown as { _sender: Record<string, unknown>, _socket: unknown }
  t.equal(internals._sender._state, 0, 'the idle sender state is 0 (DEFAULT)')
  t.equal(internals._sender._firstFragment, true)
  t.ok(Array.isArray(internals._sender._queue))
  t.equal(typeof (internals._socket as { write?: unknown }).write, 'function')
})

t.test('a frame is the header ws itself writes, for each payload length form', async (t) => {
  for (const [length, header] of [[5, [0x81, 5]], [200, [0x81, 126, 0, 200]], [70_000, [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]]] as const) {
    const payload = Buffer.alloc(length, 'a')
    const frame = frameText(payload)
    t.same([...frame.subarray(0, header.length)], header, `header for ${length} bytes`)
    t.equal(frame.length, header.length + length)
    t.ok(frame.subarray(header.length).equals(payload))
  }
})

t.test('one rendered event is framed once and written to every socket, in order with ws.send', async (t) => {
  const pairs = await connect(t, 3)
  const transports = pairs.map(p => new WebSocketTransport(p.server))
  const built = frameStats.built
  const written = frameStats.written
  const event = Buffer.from(JSON.stringify({ status: 'processing', progress: 'é 1/2' }))
  for (const tr of transports) {
    tr.write('control-before', () => {})
    tr.write(event, () => {})
    tr.write('control-after', () => {})
  }
  t.equal(frameStats.built - built, 1, 'framed once for three sockets')
  t.equal(frameStats.written - written, 3, 'written straight to each socket')
  t.equal(frameOf(event), frameOf(event), 'the same frame again')
  for (const p of pairs) {
    await until(p.client, p.received, 3)
    t.same(p.received, ['control-before', '{"status":"processing","progress":"é 1/2"}', 'control-after'], 'a text frame, in send order')
  }
})

t.test('frames of one tick: one is held and written alone at its end, several go out in one write', async (t) => {
  const [p, q] = await connect(t, 2)
  const one = new WebSocketTransport(p.server)
  const two = new WebSocketTransport(q.server)
  const netOf = (ws: WebSocket) => (ws as unknown as { _socket: { writableCorked: number, writableLength: number } })._socket
  const flushed: string[] = []
  one.write(Buffer.from('a1'), (err) => flushed.push(`a1:${String(err ?? 'ok')}`))
  two.write(Buffer.from('b1'), () => {})
  two.write(Buffer.from('b2'), () => {})
  t.equal(netOf(p.server).writableLength, 0, 'a single frame is held, not yet handed to the socket')
  t.equal(netOf(p.server).writableCorked, 0, 'and the socket is not corked for it')
  t.ok(one.bufferedAmount > 0, 'it counts as unflushed meanwhile')
  t.equal(netOf(q.server).writableCorked, 1, 'a second frame in the tick corks the socket: one write for both')
  t.ok(two.bufferedAmount > 0)
  await new Promise(resolve => process.nextTick(resolve))
  t.equal(netOf(q.server).writableCorked, 0, 'uncorked once the tick ends')
  await until(p.client, p.received, 1)
  await until(q.client, q.received, 2)
  t.same(p.received, ['a1'])
  t.same(q.received, ['b1', 'b2'], 'in order')
  t.same(flushed, ['a1:ok'], 'the held frame reports its flush')
})

t.test('a frame held for the end of the tick goes before a close sent in the same tick', async (t) => {
  const [p] = await connect(t, 1)
  const tr = new WebSocketTransport(p.server)
  tr.write(Buffer.from('last'), () => {})
  tr.close(4000, 'bye')
  const [code] = await once(p.client, 'close') as [number]
  t.equal(code, 4000)
  t.same(p.received, ['last'], 'the frame arrived before the close')
})

t.test('a held frame of a socket terminated in the same tick fails its write, and nothing is sent', async (t) => {
  const [p] = await connect(t, 1)
  const tr = new WebSocketTransport(p.server)
  const result = new Promise<Error | null | undefined>(resolve => tr.write(Buffer.from('never'), resolve))
  tr.terminate()
  t.ok(await result instanceof Error, 'done runs with an error')
  await once(p.client, 'close')
  t.same(p.received, [])
})

t.test('permessage-deflate negotiated: ws.send compresses as before', async (t) => {
  const [p] = await connect(t, 1, { perMessageDeflate: { threshold: 0 } }, { perMessageDeflate: true })
  t.notOk(canWriteFrame(p.server), 'an extension changes the frames: no prebuilt frame')
  const written = frameStats.written
  const tr = new WebSocketTransport(p.server)
  tr.write(Buffer.from('x'.repeat(1000)), () => {})
  tr.write(Buffer.from('y'.repeat(1000)), () => {})
  await until(p.client, p.received, 2)
  t.same(p.received, ['x'.repeat(1000), 'y'.repeat(1000)])
  t.equal(frameStats.written, written, 'went through ws.send')
})

t.test('a direct write counts in bufferedAmount: a stalled client gets the latest state, never a backlog', async (t) => {
  const [p] = await connect(t, 1)
  const socket = (p.client as unknown as { _socket: { pause: () => void, resume: () => void } })._socket
  socket.pause()
  const transport = new WebSocketTransport(p.server)
  const outbox = new Outbox(transport)
  outbox.send(Buffer.from('big:' + 'x'.repeat(16 * 1024 * 1024)), 'job')
  t.ok(transport.bufferedAmount > 16 * 1024, 'the unflushed frame is counted')
  outbox.send(Buffer.from('progress-1'), 'job')
  outbox.send(Buffer.from('progress-2'), 'job')
  outbox.send(Buffer.from('control'))
  outbox.send(Buffer.from('final'), 'job', true)
  t.equal(outbox.conflated, 2, 'progress-1, then progress-2 replaced while waiting')
  socket.resume()
  await until(p.client, p.received, 3)
  t.same(p.received.map(r => r.startsWith('big:') ? 'big' : r), ['big', 'control', 'final'])
  t.equal(outbox.stalledFor(Date.now()), 0, 'the flush callbacks ran')
})

t.test('a second transport on a socket takes its events over: each message and the close reach it once', async (t) => {
  const [p] = await connect(t, 1)
  const seen: string[] = []
  const events = (name: string): TransportEvents => ({
    received: (data) => { seen.push(`${name}:${data.toString()}`) },
    closed: () => { seen.push(`${name}:closed`) }
  })
  new WebSocketTransport(p.server).bind(events('a'))
  new WebSocketTransport(p.server).bind(events('b'))
  const closed = once(p.server, 'close')
  p.client.send('hi')
  await once(p.server, 'message')
  p.client.close()
  await closed
  t.same(seen, ['b:hi', 'b:closed'])
})
