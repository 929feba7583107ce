/**
 * fastify-job-progress/react: hooks over the client. React is a peer dependency.
 */
import { createContext, createElement, useCallback, useContext, useEffect, useRef, useState, type ReactNode } from 'react'
import { JobProgressClient, type ClientOptions, type MyJob, type MyJobsFilter, type UploadOptions, type UploadedJob, type Watch } from './index'
import type { ConnectionEvent, JobUpdate } from './types'

const ClientContext = createContext<JobProgressClient | null>(null)

/** Shares one client (one connection) with every hook below it. */
export function JobProgressProvider (props: { client: JobProgressClient, children?: ReactNode }): ReturnType<typeof createElement> {
  return createElement(ClientContext.Provider, { value: props.client }, props.children)
}

let fallback: JobProgressClient | null = null
/** The provider's client, or one shared client for the page (same origin, cookie session). */
export function useJobProgressClient (options?: ClientOptions): JobProgressClient {
  const fromContext = useContext(ClientContext)
  if (fromContext !== null) return fromContext
  fallback ??= new JobProgressClient(options)
  return fallback
}

export interface JobProgressState {
  /** The latest update; null until the first one. */
  update: JobUpdate | null
  /** Set once the watch ended with an error (failed, cancelled, not found, credentials). */
  error: Error | null
  /** Whether the job reached a final state (or the watch ended with an error). */
  done: boolean
  connection: ConnectionEvent
}

/**
 * How many mounted hooks use each watch: the client hands every watcher of a job the same Watch,
 * so it is stopped when the last of them unmounts, not the first.
 */
const users = new WeakMap<Watch, number>()

/** Watches a job while the component is mounted; `jobId` null watches nothing. */
export function useJobProgress (kind: string, jobId: string | null | undefined, client?: JobProgressClient): JobProgressState {
  const shared = useJobProgressClient()
  const c = client ?? shared
  const [state, setState] = useState<JobProgressState>({ update: null, error: null, done: false, connection: c.state })
  useEffect(() => {
    const offState = c.onState((connection) => setState(s => ({ ...s, connection })))
    if (jobId === null || jobId === undefined) return offState
    setState({ update: null, error: null, done: false, connection: c.state })
    const watch = c.watch(kind, jobId)
    users.set(watch, (users.get(watch) ?? 0) + 1)
    const off = watch.onUpdate((update) => setState(s => ({ ...s, update, done: watch.ended })))
    watch.done.then(
      (update) => setState(s => ({ ...s, update, done: true })),
      (error: Error) => setState(s => ({ ...s, error, done: true }))
    )
    return () => {
      off()
      offState()
      const left = (users.get(watch) as number) - 1
      users.set(watch, left)
      if (left === 0 && !watch.ended) watch.stop()
    }
  }, [c, kind, jobId])
  return state
}

export interface UploadState {
  /** Bytes sent and in all, while uploading. */
  loaded: number
  total: number
  uploading: boolean
  job: UploadedJob | null
  error: Error | null
}

/** Uploads a file; `upload(file)` resolves with the job, and the state follows the upload. */
export function useUpload (kind: string, client?: JobProgressClient): UploadState & { upload: (file: Blob, opts?: Omit<UploadOptions, 'onUploadProgress'>) => Promise<UploadedJob>, abort: () => void } {
  const shared = useJobProgressClient()
  const c = client ?? shared
  const [state, setState] = useState<UploadState>({ loaded: 0, total: 0, uploading: false, job: null, error: null })
  const controller = useRef<AbortController | null>(null)
  const upload = useCallback(async (file: Blob, opts: Omit<UploadOptions, 'onUploadProgress'> = {}) => {
    controller.current = new AbortController()
    setState({ loaded: 0, total: file.size, uploading: true, job: null, error: null })
    try {
      const job = await c.upload(kind, file, { ...opts, signal: opts.signal ?? controller.current.signal, onUploadProgress: (loaded, total) => setState(s => ({ ...s, loaded, total })) })
      setState(s => ({ ...s, uploading: false, loaded: s.total, job }))
      return job
    } catch (err) {
      setState(s => ({ ...s, uploading: false, error: err as Error }))
      throw err
    }
  }, [c, kind])
  const abort = useCallback(() => controller.current?.abort(), [])
  return { ...state, upload, abort }
}

export interface JobStreamState {
  /** The chunks so far, in order. */
  chunks: unknown[]
  /** The string chunks so far, joined (a model's answer token by token). */
  text: string
  /** Whether the stream ended (or the job did). */
  done: boolean
}

/** Follows a job's named stream while the component is mounted, resuming after reconnects; `jobId` null follows nothing. */
export function useJobStream (kind: string, jobId: string | null | undefined, name: string, client?: JobProgressClient): JobStreamState {
  const shared = useJobProgressClient()
  const c = client ?? shared
  const [state, setState] = useState<JobStreamState>({ chunks: [], text: '', done: false })
  useEffect(() => {
    setState({ chunks: [], text: '', done: false })
    if (jobId === null || jobId === undefined) return
    const watch = c.watch(kind, jobId)
    users.set(watch, (users.get(watch) ?? 0) + 1)
    const chunks = watch.stream(name)
    let mounted = true
    void (async () => {
      const got: unknown[] = []
      let text = ''
      for await (const chunk of chunks) {
        got.push(chunk)
        if (typeof chunk === 'string') text += chunk
        if (mounted) setState({ chunks: got, text, done: false })
      }
      if (mounted) setState({ chunks: got, text, done: true })
    })()
    return () => {
      mounted = false
      void chunks.return?.()
      const left = (users.get(watch) as number) - 1
      users.set(watch, left)
      if (left === 0 && !watch.ended) watch.stop()
    }
  }, [c, kind, jobId, name])
  return state
}

export interface MyJobsState {
  /** The caller's jobs, newest first (empty until read). */
  jobs: MyJob[]
  /** Whether the list was read (it then follows the feed). */
  ready: boolean
  /** Set once the list ended with an error (credentials, a refused filter, a server without the feed). */
  error: Error | null
  connection: ConnectionEvent
}

/** The caller's jobs while the component is mounted, kept current by the feed and read again after reconnects. */
export function useMyJobs (filter: MyJobsFilter = {}, client?: JobProgressClient): MyJobsState {
  const shared = useJobProgressClient()
  const c = client ?? shared
  const [state, setState] = useState<MyJobsState>({ jobs: [], ready: false, error: null, connection: c.state })
  // A filter written inline is a new object each render: what it says decides, not its identity.
  const key = JSON.stringify(filter)
  useEffect(() => {
    setState({ jobs: [], ready: false, error: null, connection: c.state })
    const list = c.myJobs(JSON.parse(key))
    const offState = c.onState((connection) => setState(s => ({ ...s, connection })))
    const off = list.onUpdate((jobs) => setState(s => ({ ...s, jobs, ready: list.ready, error: list.error })))
    return () => {
      off()
      offState()
      list.close()
    }
  }, [c, key])
  return state
}
