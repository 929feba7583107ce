import t from 'tap'
import { once } from 'node:events'
import WebSocket, { WebSocketServer } from 'ws'
import { SessionRegistry } from '../lib/session/session-set'
import { Outbox } from '../lib/session/outbox'
import { WebSocketTransport } from '../lib/transports/websocket'

// The checks at most a second apart visit the sessions with a send in flight and those whose
// credential expires, not every session: an idle socket is in neither.
t.test('a session is in the smaller sets only while it belongs to the instance', async t => {
  const set = new SessionRegistry<object>()
  const a = {}
  const b = {}
  const rows: Array<[string, () => void, { busy: object[], expiring: object[] }]> = [
    ['not yet added: nothing is kept', () => { set.sending(a); set.expires(a) }, { busy: [], expiring: [] }],
    ['added: neither set', () => { set.add(a); set.add(b) }, { busy: [], expiring: [] }],
    ['a send in flight', () => set.sending(a), { busy: [a], expiring: [] }],
    ['a credential that expires', () => set.expires(b), { busy: [a], expiring: [b] }],
    ['deleted: from both', () => { set.delete(a); set.delete(b) }, { busy: [], expiring: [] }],
    ['a send after the delete keeps nothing', () => set.sending(a), { busy: [], expiring: [] }]
  ]
  for (const [name, step, want] of rows) {
    step()
    t.same({ busy: [...set.busy], expiring: [...set.expiring] }, want, name)
  }
})

t.test('an outbox tells its owner when a send is in flight again, once until it flushes', async t => {
  const wss = new WebSocketServer({ port: 0, host: '127.0.0.1' })
  await once(wss, 'listening')
  const client = new WebSocket(`ws://127.0.0.1:${(wss.address() as { port: number }).port}`)
  const [server] = await once(wss, 'connection') as [WebSocket]
  t.teardown(async () => {
    client.terminate()
    await new Promise(resolve => wss.close(resolve))
  })
  let sending = 0
  const outbox = new Outbox(new WebSocketTransport(server), { owner: { overflowed () {}, sending: () => sending++ } })
  outbox.send('one')
  outbox.send('two')
  t.equal(sending, 1, 'two sends in one tick: told once')
  await once(client, 'message')
  await new Promise(resolve => setImmediate(resolve))
  t.equal(outbox.stalledFor(Date.now()), 0, 'flushed')
  outbox.send('three')
  t.equal(sending, 2, 'in flight again after a flush: told again')
})
