import type { FastifyReply } from 'fastify'
import type { Redis } from 'ioredis'
import type { Readable } from 'node:stream'
import { InvalidOutputNameError, OutputNotFoundError, RangeNotSatisfiableError } from '../errors'
import type { Keys } from './keys'
import type { Storage } from './storage'

/** What a worker attached to a job: listed in its result, downloadable by those who may read it. */
export interface OutputFile {
  name: string
  key: string
  size: number
  type: string
}

/** Names are path segments of the download URL and part of a storage key: kept to safe characters. */
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/

export function isOutputName (name: unknown): name is string {
  return typeof name === 'string' && NAME.test(name) && !name.includes('..')
}

/** Storage kinds of outputs do not name a queue, so the upload sweep leaves them alone. */
const outputKind = (kind: string, name: string): string => `${kind}.out.${name}`

/**
 * Stores a worker's output file and records it on the job. A second output of the same name
 * replaces the first (a retried attempt writes its outputs again).
 */
export async function putOutput (redis: Redis, keys: Keys, storage: Storage, queue: string, kind: string, jobId: string, name: string, source: Readable, type = 'application/octet-stream'): Promise<OutputFile> {
  if (!isOutputName(name)) throw new InvalidOutputNameError(name)
  const stored = await storage.write(source, { kind: outputKind(kind, name), jobId, filename: name, mimetype: type })
  const file: OutputFile = { name, key: stored.key, size: stored.size, type }
  await redis.hset(keys.outputs(queue, jobId), name, JSON.stringify(file))
  return file
}

/** A job's outputs, by name. */
export async function listOutputs (redis: Redis, keys: Keys, queue: string, jobId: string): Promise<OutputFile[]> {
  const all = await redis.hgetall(keys.outputs(queue, jobId))
  return Object.values(all).map(v => JSON.parse(v) as OutputFile).sort((a, b) => a.name.localeCompare(b.name))
}

/** Parses one `bytes=` range (RFC 9110): null for none or one we do not serve (answered whole). */
export function parseRange (header: string | undefined, size: number): { start: number, end: number } | null | 'unsatisfiable' {
  if (header === undefined) return null
  const match = /^bytes=(\d*)-(\d*)$/.exec(header.trim())
  if (match === null || (match[1] === '' && match[2] === '')) return null
  let start: number
  let end: number
  if (match[1] === '') {
    // A suffix: the last N bytes.
    const n = Number(match[2])
    if (n === 0) return 'unsatisfiable'
    start = Math.max(0, size - n)
    end = size - 1
  } else {
    start = Number(match[1])
    end = match[2] === '' ? size - 1 : Math.min(Number(match[2]), size - 1)
    if (match[2] !== '' && Number(match[2]) < start) return null
  }
  if (start >= size) return 'unsatisfiable'
  return { start, end }
}

/**
 * Streams one output, whole (200) or one byte range (206), `Accept-Ranges: bytes`. A storage
 * without `openRange` answers whole files only.
 */
export async function sendOutput (reply: FastifyReply, storage: Storage, file: OutputFile | undefined, rangeHeader: string | undefined): Promise<FastifyReply> {
  if (file === undefined) throw new OutputNotFoundError()
  const canRange = storage.openRange !== undefined
  const range = canRange ? parseRange(rangeHeader, file.size) : null
  reply.header('content-type', file.type)
  reply.header('content-disposition', `attachment; filename="${file.name}"`)
  if (canRange) reply.header('accept-ranges', 'bytes')
  if (range === 'unsatisfiable') {
    reply.header('content-range', `bytes */${file.size}`)
    throw new RangeNotSatisfiableError(file.size)
  }
  if (range === null) {
    reply.header('content-length', String(file.size))
    return await reply.code(200).send(storage.open(file.key))
  }
  reply.header('content-range', `bytes ${range.start}-${range.end}/${file.size}`)
  reply.header('content-length', String(range.end - range.start + 1))
  return await reply.code(206).send((storage.openRange as NonNullable<Storage['openRange']>)(file.key, range.start, range.end))
}
