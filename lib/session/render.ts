import type { JobEvent } from '../core/event'
import type { ProtocolDefinition, ServerMessage } from '../protocols/types'
import type { LogMessage } from '../wire/messages'

export const serialize = (message: ServerMessage): string | undefined =>
  message === undefined ? undefined : typeof message === 'string' ? message : JSON.stringify(message)

/**
 * The hub hands the same event object to every session watching the job, one after the other:
 * render and serialize it once per protocol, not once per session.
 */
interface Rendered { event: JobEvent, text: string | undefined, bytes: Buffer | undefined }
const rendered = new WeakMap<ProtocolDefinition, Rendered>()
export function renderOnce (protocol: ProtocolDefinition, event: JobEvent): Rendered {
  const last = rendered.get(protocol)
  if (last !== undefined && last.event === event) return last
  const text = serialize(protocol.render(event))
  // Encoded once too: the transport would otherwise turn the same string into bytes for each.
  const next = { event, text, bytes: text === undefined ? undefined : Buffer.from(text) }
  rendered.set(protocol, next)
  return next
}

/** A live log line goes to every watcher of its job as one object: rendered and encoded once per protocol. */
const renderedLog = new WeakMap<ProtocolDefinition, { message: LogMessage, bytes: Buffer | undefined }>()
export function logBytes (protocol: ProtocolDefinition, render: (m: LogMessage) => ServerMessage, message: LogMessage): Buffer | undefined {
  const last = renderedLog.get(protocol)
  if (last !== undefined && last.message === message) return last.bytes
  const text = serialize(render(message))
  const bytes = text === undefined ? undefined : Buffer.from(text)
  renderedLog.set(protocol, { message, bytes })
  return bytes
}
