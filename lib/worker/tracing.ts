import { context, SpanKind, SpanStatusCode, trace, TraceFlags, type Context, type Span } from '@opentelemetry/api'
import type { Job } from 'bullmq'
import { contextFromMetadata, formatTraceparent, TRACER_NAME } from '../core/tracing'

/**
 * OpenTelemetry traces, worker side: the job's processing span under the context the job was
 * added with (BullMQ's `tm`), a span per `report()`, and the report span's traceparent written
 * into the progress value when it is sampled, so the plugin's delivery spans find their parent in
 * the relayed message without reading the job. Without an SDK registered every span is the API's
 * no-op and nothing is written. The plugin side is `lib/core/tracing.ts`.
 */

/** A report's span, open while the progress is written. */
export interface ReportSpan {
  /** What to write in the progress value's `tp`: set only when the span is sampled. */
  readonly traceparent: string | undefined
  /** Ends the span; with an error when the report failed. */
  end: (err?: unknown) => void
}

/** One job attempt's traces. */
export interface JobTrace {
  /** Runs the processor inside the job's processing span (or the one BullMQ's telemetry opened). */
  run: <R>(fn: () => Promise<R>) => Promise<R>
  /** Starts the span of one report, a child of the processing span. */
  report: (processed: number, total: number) => ReportSpan
}

const NO_REPORT: ReportSpan = { traceparent: undefined, end () {} }

/** Off: the processor runs as it is and reports carry nothing. */
export const noJobTrace: JobTrace = {
  run: async (fn) => await fn(),
  report: () => NO_REPORT
}

function failed (span: Span, err: unknown): void {
  span.recordException(err instanceof Error ? err : String(err))
  span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) })
}

/**
 * The traces of one attempt of `job`. With `bullmq` (the worker was given BullMQ's telemetry),
 * BullMQ's own `process <queue>` span is the active one when the processor runs, and the reports
 * are its children; otherwise the helper opens a `process <queue>` span of its own under the
 * job's `tm`.
 */
export function jobTrace (job: Job, queue: string, bullmq: boolean): JobTrace {
  const tracer = trace.getTracer(TRACER_NAME)
  const attributes = { 'messaging.system': 'bullmq', 'messaging.destination.name': queue, 'jp.job.id': String(job.id), 'jp.attempt': Math.max(job.attemptsStarted, 1) }
  let parent: Context = context.active()
  return {
    async run (fn) {
      if (bullmq) {
        parent = context.active()
        return await fn()
      }
      const span = tracer.startSpan(`process ${queue}`, { kind: SpanKind.CONSUMER, attributes }, contextFromMetadata(context.active(), job.opts.telemetry?.metadata))
      parent = trace.setSpan(context.active(), span)
      try {
        return await context.with(parent, fn)
      } catch (err) {
        failed(span, err)
        throw err
      } finally {
        span.end()
      }
    },
    report (processed, total) {
      const span = tracer.startSpan(`report ${queue}`, { kind: SpanKind.PRODUCER, attributes: { ...attributes, 'jp.processed': processed, 'jp.total': total } }, parent)
      const sc = span.spanContext()
      return {
        traceparent: (sc.traceFlags & TraceFlags.SAMPLED) === TraceFlags.SAMPLED && trace.isSpanContextValid(sc) ? formatTraceparent(sc) : undefined,
        end (err) {
          if (err !== undefined && err !== null) failed(span, err)
          span.end()
        }
      }
    }
  }
}
