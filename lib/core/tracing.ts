import { context, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, TraceFlags, type Context, type Span, type SpanContext, type Tracer } from '@opentelemetry/api'
import type { Telemetry as BullTelemetry } from 'bullmq'
import type { JobEvent } from './event'

/**
 * OpenTelemetry traces, plugin side: the job's trace context goes into the job where BullMQ's own
 * telemetry keeps it, and each relayed report whose trace is sampled gets a delivery span on
 * every instance that writes it to a socket or an SSE stream.
 *
 * Only `@opentelemetry/api` is used: without an SDK registered by the app, every tracer is the
 * API's no-op, no trace context is written into jobs and no report carries one, so the per
 * message path pays one property read. The worker side is `lib/worker/tracing.ts`.
 */

/** The tracer's name, as it appears in the spans' instrumentation scope. */
export const TRACER_NAME = 'fastify-job-progress'

/**
 * The progress value's field that carries the traceparent of the report span that wrote it
 * (`00-<trace id>-<span id>-01`), only when that span is sampled. The relay carries the progress
 * value as it is, so the delivery span finds its parent without a read per event; the hub reads
 * the known fields of a progress value only, so it never reaches a client.
 */
export const TRACEPARENT_FIELD = 'tp'

const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/

/** The W3C traceparent of a span context. */
export function formatTraceparent (sc: SpanContext): string {
  return `00-${sc.traceId}-${sc.spanId}-${sc.traceFlags === TraceFlags.SAMPLED ? '01' : '00'}`
}

/** A W3C traceparent read back as a remote span context; null for anything else. */
export function parseTraceparent (value: unknown): SpanContext | null {
  if (typeof value !== 'string') return null
  const m = TRACEPARENT.exec(value)
  if (m === null || /^0+$/.test(m[1]) || /^0+$/.test(m[2])) return null
  return { traceId: m[1], spanId: m[2], traceFlags: parseInt(m[3], 16) & TraceFlags.SAMPLED, isRemote: true }
}

/**
 * BullMQ's trace context metadata (the job option `telemetry.metadata`, stored as `tm`): a JSON
 * carrier of W3C headers, as BullMQ's OpenTelemetry add-on writes it. Empty when the context has
 * no span: BullMQ then stores nothing.
 */
export function contextMetadata (ctx: Context): string {
  const sc = trace.getSpanContext(ctx)
  if (sc === undefined || !trace.isSpanContextValid(sc)) return ''
  return JSON.stringify({ traceparent: formatTraceparent(sc) })
}

/** The context a job's `telemetry.metadata` names as its parent; `base` when it names none. */
export function contextFromMetadata (base: Context, metadata: unknown): Context {
  if (typeof metadata !== 'string' || metadata === '') return base
  let carrier: unknown
  try {
    carrier = JSON.parse(metadata)
  } catch {
    return base
  }
  const sc = parseTraceparent((carrier as Record<string, unknown> | null)?.traceparent)
  return sc === null ? base : trace.setSpanContext(base, sc)
}

function bullSpan (span: Span): ReturnType<BullTelemetry['tracer']['startSpan']> {
  return {
    setSpanOnContext: (ctx: Context) => trace.setSpan(ctx, span),
    setAttribute: (key, value) => { span.setAttribute(key, value) },
    setAttributes: (attributes) => { span.setAttributes(attributes as never) },
    addEvent: (name, attributes) => { span.addEvent(name, attributes as never) },
    recordException: (exception, time) => {
      span.recordException(exception as never, time)
      span.setStatus({ code: SpanStatusCode.ERROR })
    },
    end: () => span.end()
  }
}

/**
 * BullMQ's `Telemetry` on the OpenTelemetry API, for the queues the plugin makes: `Queue.add`
 * then starts BullMQ's producer span (`add <queue>.<kind>`) under the active context (the
 * request's span with `@fastify/otel`) and stores its context in the job, where a worker with
 * BullMQ's telemetry, or the plugin's worker helper, reads it.
 */
export function bullmqTelemetry (tracer: Tracer = trace.getTracer(TRACER_NAME)): BullTelemetry<Context> {
  return {
    tracer: {
      startSpan: (name, options, ctx) => bullSpan(tracer.startSpan(name, { kind: (options?.kind ?? SpanKind.INTERNAL) as number as SpanKind }, ctx))
    },
    contextManager: {
      with: (ctx, fn) => context.with(ctx, fn),
      active: () => context.active(),
      root: () => ROOT_CONTEXT,
      getMetadata: contextMetadata,
      fromMetadata: contextFromMetadata
    }
  }
}

/** The most span events one delivery span holds (one per local watcher written to). */
export const MAX_WRITE_EVENTS = 32

/** One delivery span, open while a state is written to the local watchers. */
export interface Delivery {
  /** One watcher written to (a span event, up to {@link MAX_WRITE_EVENTS}). */
  written: () => void
  end: () => void
}

/** The plugin's tracing: the BullMQ telemetry for its queues and the delivery spans. */
export interface Tracing {
  /** For the queues the plugin makes; undefined when tracing is off. */
  readonly bullmq: BullTelemetry<Context> | undefined
  /** Remembers the report a relayed state came from (the progress value's traceparent), when its trace is sampled. */
  tag: (event: JobEvent, progress: unknown) => void
  /**
   * A delivery span for a state about to be written to the local watchers, when it came from a
   * sampled report: a child of the report span, from the report's stream entry to the last
   * write, with one span event per watcher. Null otherwise (nothing to do).
   */
  delivery: (event: JobEvent, queue: string, watchers: number) => Delivery | null
}

/** Off: no telemetry for BullMQ, no delivery spans. */
export const noTracing: Tracing = {
  bullmq: undefined,
  tag () {},
  delivery: () => null
}

/** Tracing on the OpenTelemetry API: spans only once the app registered an SDK, and only for sampled traces. */
export function createTracing (tracer: Tracer = trace.getTracer(TRACER_NAME)): Tracing {
  // Keyed by the state object the hub hands to every watcher: nothing is added to the state
  // itself, so no protocol can render it.
  const reports = new WeakMap<JobEvent, SpanContext>()
  return {
    bullmq: bullmqTelemetry(tracer),
    tag (event, progress) {
      if (progress === null || typeof progress !== 'object') return
      const tp = (progress as Record<string, unknown>)[TRACEPARENT_FIELD]
      if (tp === undefined) return
      const sc = parseTraceparent(tp)
      if (sc !== null && sc.traceFlags === TraceFlags.SAMPLED) reports.set(event, sc)
    },
    delivery (event, queue, watchers) {
      const parent = reports.get(event)
      if (parent === undefined) return null
      // Started at the report's stream entry (Redis's clock): the span shows the relay's time too.
      const span = tracer.startSpan(`deliver ${queue}`, {
        kind: SpanKind.CONSUMER,
        startTime: event.ts,
        attributes: {
          'messaging.system': 'bullmq',
          'messaging.destination.name': queue,
          'jp.job.id': event.jobId,
          'jp.job.kind': event.kind,
          'jp.version': event.version ?? '',
          'jp.watchers': watchers,
          'jp.relay.ms': Math.max(0, Date.now() - event.ts)
        }
      }, trace.setSpanContext(ROOT_CONTEXT, parent))
      let writes = 0
      return {
        written () { if (++writes <= MAX_WRITE_EVENTS) span.addEvent('write') },
        end () {
          span.setAttribute('jp.writes', writes)
          span.end()
        }
      }
    }
  }
}
