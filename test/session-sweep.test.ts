import t from 'tap'
import { once } from 'node:events'
import WebSocket from 'ws'
import { jobsProtocol } from '../lib/index'
import { redisFor, startApp } from './helpers/index'

// The keepalive and heartbeat sweeps visit every session once per interval, a slice per tick:
// at 100,000 sockets a sweep that pinged them all in one turn would stall every socket's
// messages for that turn. Each socket is still pinged, and gets its heartbeat, once per interval.

const PATH = '/ws/jobs'
const SOCKETS = 100
const INTERVAL = 2_000

t.test(`pings and heartbeats of ${SOCKETS} sockets are spread over the interval, each socket once per round`, async (t) => {
  const redis = await redisFor(t)
  const { ws } = await startApp(t, redis, { apiKeys: { k: 'alice' }, protocols: [jobsProtocol({ path: PATH })], pingIntervalMs: INTERVAL, heartbeatIntervalMs: INTERVAL, maxConnectionsPerOwner: SOCKETS })
  const pings: number[][] = []
  const beats: number[][] = []
  const sockets = await Promise.all(Array.from({ length: SOCKETS }, async (_, i) => {
    const socket = new WebSocket(`${ws}${PATH}?api_key=k`)
    t.teardown(() => socket.terminate())
    pings[i] = []
    beats[i] = []
    socket.on('ping', () => pings[i].push(Date.now()))
    socket.on('message', (data) => { if ((JSON.parse(String(data)) as { type: string }).type === 'heartbeat') beats[i].push(Date.now()) })
    await once(socket, 'message')
    return socket
  }))
  // Two full rounds after every socket is open.
  const all = (times: number[][]): Promise<void> => new Promise(resolve => {
    const check = setInterval(() => { if (times.every(x => x.length >= 3)) { clearInterval(check); resolve() } }, 50)
  })
  await Promise.all([all(pings), all(beats)])
  for (const [name, times] of [['pings', pings], ['heartbeats', beats]] as const) {
    // The second round of each socket: every socket had a full one by then.
    const second = times.map(x => x[1]).sort((a, b) => a - b)
    const span = second[second.length - 1] - second[0]
    t.ok(span >= INTERVAL * 0.5, `${name}: one round spread over ${span} ms of the ${INTERVAL} ms interval (all in one turn: a few ms)`)
    const gaps = times.map(x => x[2] - x[1])
    t.ok(gaps.every(g => g >= INTERVAL * 0.75 && g <= INTERVAL * 2.5), `${name}: each socket once per interval (gaps ${Math.min(...gaps)} to ${Math.max(...gaps)} ms)`)
  }
  t.ok(sockets.every(s => s.readyState === WebSocket.OPEN), 'every socket answered its pings and is open')
})
