import type { FastifyInstance } from 'fastify'
import { Counter, Gauge, Histogram, Registry, type Metric } from 'prom-client'
import { METRICS, type Labels, type MetricName, type Telemetry } from './telemetry'
import { InvalidOptionError } from '../errors'
import { redactedRequest } from './redact'

/** The `metrics` option: `true` serves `<routePrefix>/metrics` from a registry of the plugin's own. */
export interface MetricsOptions {
  /** Route of the Prometheus text endpoint; `false` registers the metrics without a route. @defaultValue '<routePrefix>/metrics' */
  path?: string | false
  /** A prom-client registry to register into (the app's own, next to its other metrics). @defaultValue a new Registry */
  registry?: Registry
  /** Prefix of every metric name. @defaultValue 'job_progress_' */
  prefix?: string
}

/** Relay latency buckets, seconds: from a local hand-off to a slow cross-instance trip. */
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]

/** Checks the `metrics` option at register time. */
export function resolveMetrics (value: unknown): Required<Omit<MetricsOptions, 'registry'>> & { registry: Registry } | null {
  if (value === undefined || value === false) return null
  const opts = (value === true ? {} : value) as MetricsOptions
  if (opts === null || typeof opts !== 'object') throw new InvalidOptionError('`metrics` must be true, false or { path?, registry?, prefix? }')
  const path = opts.path ?? '/metrics'
  if (path !== false && (typeof path !== 'string' || !path.startsWith('/'))) throw new InvalidOptionError('`metrics.path` must start with "/" (or be false)')
  if (opts.registry !== undefined && (typeof opts.registry !== 'object' || typeof (opts.registry as Registry).metrics !== 'function')) {
    throw new InvalidOptionError('`metrics.registry` must be a prom-client Registry')
  }
  const prefix = opts.prefix ?? 'job_progress_'
  if (!/^[a-zA-Z_:][a-zA-Z0-9_:]*$/.test(prefix)) throw new InvalidOptionError('`metrics.prefix` must be a valid Prometheus metric name prefix')
  return { path, registry: opts.registry ?? new Registry(), prefix }
}

/**
 * The telemetry seam, reported to Prometheus through prom-client. Gauges are read when scraped
 * (no work between scrapes); counters and histograms are named once in `METRICS`.
 */
export function prometheusTelemetry (registry: Registry, prefix = 'job_progress_'): Telemetry {
  const readers = new Map<MetricName, Array<() => number | Array<[Labels, number]>>>()
  const made = new Map<MetricName, Metric>()
  const metric = (name: MetricName): Metric => {
    const known = made.get(name)
    if (known !== undefined) return known
    const spec = METRICS[name]
    const full = prefix + name.replace(/[A-Z]/g, c => '_' + c.toLowerCase()) + (spec.type === 'counter' ? '_total' : name === 'relayLatency' ? '_seconds' : '')
    const labelNames = [...spec.labels] as string[]
    // A registry shared between apps (tests, several plugins) keeps the first registration.
    const existing = registry.getSingleMetric(full)
    let m: Metric
    if (existing !== undefined) m = existing
    else if (spec.type === 'counter') m = new Counter({ name: full, help: spec.help, labelNames, registers: [registry] })
    else if (spec.type === 'histogram') m = new Histogram({ name: full, help: spec.help, labelNames, buckets: LATENCY_BUCKETS, registers: [registry] })
    else {
      m = new Gauge({
        name: full,
        help: spec.help,
        labelNames,
        registers: [registry],
        collect () {
          this.reset()
          for (const read of readers.get(name) ?? []) {
            const value = read()
            if (typeof value === 'number') this.inc(value)
            else for (const [labels, n] of value) this.inc(labels, n)
          }
        }
      })
    }
    made.set(name, m)
    return m
  }
  return {
    count (name, labels = {}, n = 1) {
      (metric(name) as Counter).inc(labels, n)
    },
    observe (name, value, labels = {}) {
      (metric(name) as Histogram).observe(labels, value)
    },
    gauge (name, read) {
      const list = readers.get(name) ?? []
      list.push(read)
      readers.set(name, list)
      metric(name)
    }
  }
}

/** Serves a registry's metrics in Prometheus' text format. */
export function metricsRoute (fastify: FastifyInstance, path: string, registry: Registry): void {
  const schema = { summary: 'Prometheus metrics', produces: ['text/plain'], response: { 200: { description: 'the text exposition format', type: 'string' } } }
  // Logged without credentials in the URL, like the plugin's other routes.
  fastify.get(path, { schema, logSerializers: { req: redactedRequest } }, async (_request, reply) => {
    return await reply.type(registry.contentType).send(await registry.metrics())
  })
}

/** Sends every report to each of several backends (the user's and Prometheus). */
export function teeTelemetry (all: Telemetry[]): Telemetry {
  if (all.length === 1) return all[0]
  return {
    count: (name, labels, n) => { for (const t of all) t.count(name, labels, n) },
    observe: (name, value, labels) => { for (const t of all) t.observe(name, value, labels) },
    gauge: (name, read) => { for (const t of all) t.gauge(name, read) }
  }
}
