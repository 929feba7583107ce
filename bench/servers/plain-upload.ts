import fastifyMultipart from '@fastify/multipart'
import Fastify from 'fastify'
import { randomUUID } from 'node:crypto'
import { createWriteStream } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'
import { pipeline } from 'node:stream/promises'
import { commonHandlers, serve } from '../lib/ipc'

/** The upload peer: a plain @fastify/multipart route that pipes the file to disk. */
async function main (): Promise<void> {
  const cfg = JSON.parse(process.env.BENCH_CONFIG as string) as { uploadDir: string, fileSize: number }
  await mkdir(cfg.uploadDir, { recursive: true })
  const app = Fastify({ logger: false })
  await app.register(fastifyMultipart, { limits: { fileSize: cfg.fileSize, files: 1 } })
  app.post('/upload', async (request, reply) => {
    const file = await request.file()
    if (file === undefined) return await reply.code(400).send({ error: 'no file' })
    const path = join(cfg.uploadDir, randomUUID())
    await pipeline(file.file, createWriteStream(path))
    return await reply.code(202).send({ path })
  })
  await app.listen({ port: 0, host: '127.0.0.1' })
  const { port } = app.server.address() as { port: number }
  serve(commonHandlers(async () => { await app.close() }), { port })
}

main().catch((err) => {
  process.stderr.write(`plain upload server: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
