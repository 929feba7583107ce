import { execFileSync } from 'node:child_process'
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http'
import { createServer as createTlsServer } from 'node:https'
import type { AddressInfo, Socket } from 'node:net'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Webhook } from 'standardwebhooks'
import { tempDir } from './index'

interface Teardown { teardown: (fn: () => unknown) => void }

export interface Call {
  n: number
  at: number
  path: string
  headers: IncomingMessage['headers']
  body: string
  /** The standardwebhooks verification of each configured secret: true when it accepted. */
  verified: boolean[]
}

/** What to answer call `n` (1-based): a status with headers and body, or 'hang' to never answer. */
export type Answer = { status: number, headers?: Record<string, string>, body?: string } | 'hang'

/**
 * A real HTTP webhook receiver on 127.0.0.1 that verifies every call with `standardwebhooks`
 * for each secret, records it, and answers as the test says; closed at teardown.
 */
export class Receiver {
  readonly calls: Call[] = []
  url = ''
  port = 0
  answer: (call: Call) => Answer = () => ({ status: 200 })
  readonly #server: Server
  readonly #sockets = new Set<Socket>()
  readonly #secrets: string[]
  #waiters: Array<{ n: number, resolve: () => void }> = []

  constructor (secrets: string[], tls?: { key: Buffer, cert: Buffer }) {
    this.#secrets = secrets
    const handle = (req: IncomingMessage, res: ServerResponse): void => this.#handle(req, res)
    this.#server = tls === undefined ? createServer(handle) : createTlsServer(tls, handle)
    this.#server.on('connection', (socket) => {
      this.#sockets.add(socket)
      socket.once('close', () => this.#sockets.delete(socket))
    })
  }

  /** Over https when `tls` is given; `url` then names `localhost`, the certificate's name. */
  static async start (t: Teardown, secrets: string[], tls?: { key: Buffer, cert: Buffer }): Promise<Receiver> {
    const receiver = new Receiver(secrets, tls)
    await new Promise<void>(resolve => receiver.#server.listen(0, '127.0.0.1', resolve))
    receiver.port = (receiver.#server.address() as AddressInfo).port
    receiver.url = tls === undefined ? `http://127.0.0.1:${receiver.port}` : `https://localhost:${receiver.port}`
    t.teardown(async () => await receiver.close())
    return receiver
  }

  #handle (req: IncomingMessage, res: ServerResponse): void {
    let body = ''
    req.on('data', (chunk: Buffer) => { body += chunk.toString() })
    req.on('end', () => {
      const headers = req.headers as Record<string, string>
      const verified = this.#secrets.map(secret => {
        try {
          new Webhook(secret).verify(body, headers)
          return true
        } catch {
          return false
        }
      })
      const call: Call = { n: this.calls.length + 1, at: Date.now(), path: req.url ?? '', headers: req.headers, body, verified }
      this.calls.push(call)
      this.#waiters = this.#waiters.filter(w => {
        if (this.calls.length < w.n) return true
        w.resolve()
        return false
      })
      const answer = this.answer(call)
      if (answer === 'hang') return
      res.writeHead(answer.status, answer.headers ?? {})
      res.end(answer.body ?? '')
    })
  }

  /** Resolves once `n` calls arrived. */
  async waitCalls (n: number, timeoutMs = 20_000): Promise<Call[]> {
    if (this.calls.length < n) {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${this.calls.length} of ${n} calls within ${timeoutMs} ms`)), timeoutMs)
        this.#waiters.push({ n, resolve: () => { clearTimeout(timer); resolve() } })
      })
    }
    return this.calls
  }

  async close (): Promise<void> {
    for (const socket of this.#sockets) socket.destroy()
    await new Promise<void>(resolve => this.#server.close(() => resolve()))
  }
}

/** A fresh `whsec_` secret. */
export function newSecret (): string {
  return 'whsec_' + Buffer.from(Array.from({ length: 24 }, () => Math.floor(Math.random() * 256))).toString('base64')
}

/** A self-signed certificate for `localhost`, made with openssl in a temp directory. */
export async function selfSigned (t: Teardown): Promise<{ key: Buffer, cert: Buffer, certFile: string }> {
  const dir = await tempDir(t, 'jp-tls-')
  const keyFile = join(dir, 'key.pem')
  const certFile = join(dir, 'cert.pem')
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', keyFile, '-out', certFile,
    '-days', '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost'], { stdio: 'ignore' })
  return { key: readFileSync(keyFile), cert: readFileSync(certFile), certFile }
}
