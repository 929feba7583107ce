/** Latency percentiles (nearest rank) of merged samples, in ms. */
export function percentiles (parts: Float64Array[]): { n: number, p50: number, p99: number, max: number } {
  const n = parts.reduce((s, p) => s + p.length, 0)
  const all = new Float64Array(n)
  let at = 0
  for (const p of parts) {
    all.set(p, at)
    at += p.length
  }
  all.sort()
  const rank = (q: number): number => n === 0 ? NaN : all[Math.min(n - 1, Math.ceil(q * n) - 1)]
  return { n, p50: rank(0.5), p99: rank(0.99), max: n === 0 ? NaN : all[n - 1] }
}

export const round = (x: number, digits = 2): number => Number.isFinite(x) ? Number(x.toFixed(digits)) : x

/** Formats a number for the table: '-' when unknown. */
export function fmt (x: number | null | undefined, digits = 1): string {
  if (x === null || x === undefined || Number.isNaN(x)) return '-'
  if (!Number.isFinite(x)) return '∞'
  if (Math.abs(x) >= 10_000) return Math.round(x).toLocaleString('en-US')
  return x.toFixed(digits)
}

/** A plain-text table with a header row. */
export function table (title: string, header: string[], rows: Array<Array<string | number>>): string {
  const cells = [header, ...rows.map(r => r.map(String))]
  const widths = header.map((_, i) => Math.max(...cells.map(r => (r[i] ?? '').length)))
  const line = (r: string[]): string => r.map((c, i) => i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i])).join('  ')
  return [`\n${title}`, line(cells[0]), widths.map(w => '-'.repeat(w)).join('  '), ...cells.slice(1).map(line)].join('\n')
}
