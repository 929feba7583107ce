import { createHash } from 'node:crypto'
import { once } from 'node:events'
import { createReadStream, createWriteStream } from 'node:fs'
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises'
import { resolve, sep } from 'node:path'
import { Transform, type Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'

/** What the upload route knows about a file when it stores it. */
export interface StoredFileInfo {
  kind: string
  jobId: string
  filename: string
  mimetype: string
  /**
   * The instance writing it (its `instanceId`). A storage that keeps partial files names them
   * with it, so that an instance restarted under the same id can remove the partial files its
   * previous run left behind (killed mid-upload) at once instead of after `files.orphanAgeMs`.
   */
  writer?: string
}

/** Where uploaded files live between the upload and the end of their job. */
export interface Storage {
  /**
   * Streams `source` to storage and resolves with the key that finds it again and the bytes
   * written. It must not leave a partial file behind when `source` errors: the upload route
   * relies on that when a client aborts or a limit is hit.
   */
  write: (source: Readable, info: StoredFileInfo) => Promise<{ key: string, size: number }>
  /** Opens a stored file for reading (in the worker). */
  open: (key: string) => Readable
  /** Opens bytes `start` to `end` (inclusive) of a stored file: output downloads with `Range` need it. */
  openRange?: (key: string, start: number, end: number) => Readable
  /** Removes a stored file; a missing file is not an error. */
  remove: (key: string) => Promise<void>
  /** A local path for the key, when the storage has one (workers that need a path, not a stream). */
  localPath?: (key: string) => string
  /**
   * Every stored and partial file, for the orphan sweep; a storage without it is not swept (its
   * uploads are still removed when their jobs end).
   */
  list?: () => AsyncIterable<StoredEntry>
}

/** One file in storage, as the orphan sweep sees it. */
export interface StoredEntry {
  key: string
  /** Still being written (or cut off by a crash): removed by `remove(key)` too. */
  partial: boolean
  /** Last modification, ms since the epoch. */
  modifiedMs: number
  /** The kind and job it was stored for, when the storage can tell. */
  kind?: string
  jobId?: string
  /** Of a partial file: the `writer` it was written by, when the storage can tell (see {@link writerTag}). */
  writer?: string
}

/**
 * A writer's id as a file name may carry it: itself when it is made of letters, digits, `_` and
 * `-` (at most 64), else a digest of it. Two instances never share a tag unless they share an id.
 */
export function writerTag (writer: string): string {
  return /^[A-Za-z0-9_-]{1,64}$/.test(writer) ? writer : 'h' + createHash('sha256').update(writer).digest('hex').slice(0, 32)
}

/** `<kind>-<jobId>`, and its partial file `<kind>-<jobId>.<writer tag>.part` (`.part` alone before writers were named). */
const STORED_NAME = /^(.+)-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(?:(?:\.([A-Za-z0-9_-]{1,64}))?(\.part))?$/

/**
 * The default storage: one file per job in a directory. A file is written as
 * `<key>.<writer>.part` and renamed when complete, so a reader never sees half a file.
 */
export class DiskStorage implements Storage {
  readonly dir: string
  #ready: Promise<unknown> | undefined
  /** Partial files being written here, by key: `remove(key)` removes them too. */
  readonly #writing = new Map<string, string>()

  constructor (dir: string) {
    this.dir = resolve(dir)
  }

  localPath (key: string): string {
    const path = resolve(this.dir, key)
    // Keys are ours (job ids), but a storage must never be walked out of by a crafted key.
    if (!path.startsWith(this.dir + sep)) throw new Error(`invalid storage key: ${key}`)
    return path
  }

  async write (source: Readable, info: StoredFileInfo): Promise<{ key: string, size: number }> {
    this.#ready ??= mkdir(this.dir, { recursive: true })
    await this.#ready
    const key = `${info.kind}-${info.jobId}`
    const final = this.localPath(key)
    const partial = info.writer === undefined ? final + '.part' : `${final}.${writerTag(info.writer)}.part`
    let size = 0
    const count = new Transform({
      transform (chunk: Buffer, _enc, done) {
        size += chunk.length
        done(null, chunk)
      }
    })
    this.#writing.set(key, partial)
    const out = createWriteStream(partial, { flags: 'wx' })
    try {
      await pipeline(source, count, out)
      await rename(partial, final)
    } catch (err) {
      // A body that breaks off at once fails the pipeline while the file is still being opened:
      // removed before its stream has closed, the file would be created after the removal.
      if (!out.closed) await once(out, 'close').catch(() => {})
      await rm(partial, { force: true })
      throw err
    } finally {
      this.#writing.delete(key)
    }
    return { key, size }
  }

  open (key: string): Readable {
    return createReadStream(this.localPath(key))
  }

  openRange (key: string, start: number, end: number): Readable {
    return createReadStream(this.localPath(key), { start, end })
  }

  async remove (key: string): Promise<void> {
    const path = this.localPath(key)
    const writing = this.#writing.get(key)
    await Promise.all([rm(path, { force: true }), rm(path + '.part', { force: true }), ...(writing === undefined ? [] : [rm(writing, { force: true })])])
  }

  async * list (): AsyncIterable<StoredEntry> {
    let names: string[]
    try {
      names = await readdir(this.dir)
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return
      throw err
    }
    for (const name of names) {
      // Only names this storage writes: a shared directory's other files are left alone.
      const match = STORED_NAME.exec(name)
      if (match === null) continue
      const info = await stat(resolve(this.dir, name)).catch(() => null)
      if (info === null || !info.isFile()) continue
      // A named partial file's key is its name without `.part`: `remove(key)` finds it.
      const writer = match[3]
      const key = `${match[1]}-${match[2]}` + (writer === undefined ? '' : `.${writer}`)
      yield { key, partial: match[4] !== undefined, modifiedMs: info.mtimeMs, kind: match[1], jobId: match[2], ...(writer === undefined ? {} : { writer }) }
    }
  }

  /** Size of a stored file, or null when it is gone (used by tests and tools). */
  async size (key: string): Promise<number | null> {
    try {
      return (await stat(this.localPath(key))).size
    } catch {
      return null
    }
  }
}
