import t from 'tap'
import type { Test } from 'tap'
import { connect as tcp, type Socket } from 'node:net'
import { jobsProtocol } from '../lib/index'
import { ANSWER_MS } from '../lib/http/connections'
import { sse } from './helpers/sse'
import { redisFor, startApp, timed, uploadAs } from './helpers/index'

// app.close() ends within its grace (guarantee 7) with the long-lived HTTP answers left open
// (the my-jobs feed, a job's SSE with its logs, the multiplexed SSE), and with connections that
// serve no request: one that sent nothing (a client's pool leaves one when a fetch is aborted while
// its connection is made: the SSE client of my jobs did, and the close waited 70 s for it, until
// the client's pool hung up), one half-way through a request's head. Node counts those two as
// busy and stops timing them out at close, so without the plugin ending them the close waited
// for the client, for ever with a client that never hangs up.
const GRACE_MS = 1_000
const BOUND_MS = GRACE_MS + ANSWER_MS
// A loaded machine: the assertions allow this much over the bound.
const SLACK_MS = 4_000

const seconds = (ms: number): string => (ms / 1000).toFixed(2)

/** A raw TCP client that connects, sends `head` (maybe nothing) and never more; destroyed at teardown. */
async function silent (t: Test, port: number, head: string): Promise<{ socket: Socket, closed: Promise<void> }> {
  const socket = tcp(port, '127.0.0.1')
  socket.on('error', () => {})
  t.teardown(() => { socket.destroy() })
  const closed = new Promise<void>(resolve => socket.once('close', () => resolve()))
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve())
    socket.once('error', reject)
  })
  if (head !== '') await new Promise<void>(resolve => socket.write(head, () => resolve()))
  return { socket, closed }
}

t.test('app.close() with connections that serve no request (nothing sent, half a head) and open SSE streams: within the grace + 1 s', async (t) => {
  const redis = await redisFor(t)
  const s = await startApp(t, redis, { apiKeys: { 'key-alice': 'alice' }, protocols: [jobsProtocol()], uploads: { shutdownGraceMs: GRACE_MS } })
  const port = Number(new URL(s.url).port)
  const jobId = await uploadAs(s, 'key-alice')
  const auth = { authorization: 'Bearer key-alice' }
  // The long-lived answers, left open and unread after their first event.
  const streams = {
    'my-jobs feed': await sse(t, `${s.url}/job-progress/jobs/events`, auth),
    'job SSE with logs': await sse(t, `${s.url}/batch/${jobId}/events?logs=1`, auth),
    'multiplexed SSE': await sse(t, `${s.url}/job-progress/events?jobs=${jobId}`, auth)
  }
  for (const [name, stream] of Object.entries(streams)) {
    t.equal(stream.status, 200, `${name}: open`)
    await stream.waitFor(() => true)
  }
  // The server has taken both connections before the close starts.
  const accepted = new Promise<void>(resolve => {
    let n = 0
    const count = (): void => { if (++n === 2) { s.app.server.off('connection', count); resolve() } }
    s.app.server.on('connection', count)
  })
  const nothing = await silent(t, port, '')
  const halfHead = await silent(t, port, `GET /job-progress/jobs/events HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n`)
  await accepted

  const took = await timed(s.app.close(), BOUND_MS + SLACK_MS)
  t.comment(`app.close() with 3 SSE streams, a silent connection and half a head: ${took === null ? `still pending after ${seconds(BOUND_MS + SLACK_MS)}` : seconds(took)} s (bound ${seconds(BOUND_MS)} s)`)
  t.ok(took !== null && took < BOUND_MS + SLACK_MS, 'app.close() resolved within the bound')
  for (const [name, stream] of Object.entries(streams)) t.ok(await timed(stream.ended, 1_000) !== null, `${name}: ended`)
  t.ok(await timed(nothing.closed, 1_000) !== null, 'the silent connection was closed')
  t.ok(await timed(halfHead.closed, 1_000) !== null, 'the half-sent request\'s connection was closed')
})
