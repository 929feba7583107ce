import { createServer } from 'node:http'
import { WebSocketServer } from 'ws'
import { commonHandlers, serve } from '../lib/ipc'

/**
 * The floor of the open-sockets phase (bench/sockets.ts): a bare `ws` server that accepts
 * sockets, answers each message with one small message, and does nothing else (no pings, no
 * heartbeats, no Redis).
 */
async function main (): Promise<void> {
  const server = createServer()
  const wss = new WebSocketServer({ server })
  const reply = Buffer.from('{"type":"connected"}')
  wss.on('connection', (ws) => {
    ws.send(reply)
    ws.on('message', () => ws.send(reply))
  })
  await new Promise<void>(resolve => server.listen({ port: 0, host: '0.0.0.0', backlog: 8192 }, resolve))
  const { port } = server.address() as { port: number }
  serve({
    ...commonHandlers(async () => {
      for (const ws of wss.clients) ws.terminate()
      await new Promise(resolve => server.close(resolve))
    }),
    sockets: () => wss.clients.size
  }, { port })
}

main().catch((err) => {
  process.stderr.write(`bare ws server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
