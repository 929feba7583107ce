import { HttpError, NotFoundError } from './errors'
import { authError, parse } from './link'
import type { UploadOptions } from './types'

/** Checks an HTTP answer (status and text): its JSON body, or the error it means (`unauthorized` is told of a 401). */
export function check ([status, text]: [number, string], unauthorized: () => void, jobId?: string): any {
  const body = parse(text)
  if (status === 401) {
    unauthorized()
    throw authError(body?.message)
  }
  if (status === 404 && jobId) throw new NotFoundError(jobId)
  if (status < 200 || status > 299) throw new HttpError(status, body?.message ?? `HTTP ${status}`, body)
  return body
}

/**
 * The client's HTTP requests besides its connection: the upload's post, and how an answer is
 * read. Loaded when first used (a bundler makes it a chunk of its own).
 */

/**
 * Posts a file (after `opts.fields`) to an upload route; resolves with the answer's status and
 * text. With upload progress asked for, in a browser, through XMLHttpRequest (only it reports
 * upload progress); otherwise with `request`, reporting 0 then all.
 */
export async function post (url: URL, file: Blob, opts: UploadOptions, headers: Record<string, string>, credentials: RequestCredentials, request: (url: URL, init?: RequestInit) => Promise<Response>): Promise<[number, string]> {
  opts.signal?.throwIfAborted()
  const form = new FormData()
  for (const [k, v] of Object.entries(opts.fields ?? {})) form.append(k, v)
  form.append('file', file, opts.filename ?? (file as { name?: string }).name ?? 'upload')
  const XHR = (globalThis as { XMLHttpRequest?: typeof XMLHttpRequest }).XMLHttpRequest
  const progress = opts.onUploadProgress
  if (XHR && progress) {
    const xhr = new XHR()
    await new Promise((resolve, reject) => {
      xhr.open('POST', url)
      xhr.withCredentials = credentials === 'include'
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v)
      xhr.upload.onprogress = (e) => progress(e.loaded, e.lengthComputable ? e.total : file.size)
      // Loaded, failed or aborted: a status of 0 means no answer.
      xhr.onloadend = () => xhr.status ? resolve(0) : reject(opts.signal?.aborted ? opts.signal.reason : new HttpError(0, 'network error'))
      // An AbortSignal fires once: the listener needs no removing.
      opts.signal?.addEventListener('abort', () => xhr.abort())
      xhr.send(form)
    })
    return [xhr.status, xhr.responseText]
  }
  progress?.(0, file.size)
  const res = await request(url, { method: 'POST', body: form, signal: opts.signal })
  const text = await res.text()
  progress?.(file.size, file.size)
  return [res.status, text]
}
