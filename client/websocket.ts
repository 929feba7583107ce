import { closeError, parse, type Env, type Link } from './link'

/** The `jobs` protocol over one WebSocket: every job (and the caller's jobs feed) on it. */
export function websocket (l: Link, o: Env): void {
  const url = new URL(o.wsPath_, o.base_)
  const key = o.key_
  url.protocol = url.protocol.replace('http', 'ws')
  if (key && o.via_ === 'query') url.searchParams.set('api_key', key)
  let ws: WebSocket
  try {
    ws = new (o.Ws_ as typeof WebSocket)(url, key && o.via_ === 'subprotocol' ? [key] : undefined)
  } catch {
    // A key a browser refuses as a subprotocol (`=` or `/` in it): counts as a failure, so the next transport is tried.
    return l.end_(null)
  }
  // Sending on a closing socket does nothing.
  // A watch that wants log lines resumes after the last one it has.
  const send = (action: string) => (jobId: string): void => {
    const w = o.watches_.get(jobId)
    if (l.up_) ws.send(JSON.stringify(jobId ? { action, job_id: jobId, logs: w?.logs ? { from: w.next } : undefined, streams: w?.streams } : { action: action + '_mine' }))
  }
  l.add_ = send('subscribe')
  l.rm_ = send('unsubscribe')
  // A close event follows every error; an error without a listener would throw in Node's `ws`.
  ws.onerror = () => {}
  ws.onopen = () => {
    if (key && o.via_ === 'first-message') ws.send(JSON.stringify({ token: key }))
  }
  ws.onmessage = (e: MessageEvent) => {
    l.touch_()
    const m = parse(e.data)
    if (m?.type !== 'connected') return l.msg_(m?.type, m)
    l.live_()
    for (const jobId of l.w_.keys()) l.add_(jobId)
  }
  ws.onclose = (e: CloseEvent) => l.end_(closeError(e.code, e.reason))
  l.stop_ = () => {
    ws.onclose = null
    try { ws.close(1000) } catch {}
  }
}
