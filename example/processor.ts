import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import type { JobContext } from '../lib/index'

/**
 * The demo processor: the upload is lines of records; one record every `itemDelayMs`; a record
 * that is exactly `FAIL` fails the job with an error naming its line.
 */
export function demoProcessor (itemDelayMs: number) {
  return async function process (ctx: JobContext): Promise<{ records: number, file: string }> {
    // Count first (a streamed pass) so progress has a total, then process in a second pass.
    let total = 0
    for await (const line of createInterface({ input: ctx.open(), crlfDelay: Infinity })) {
      if (line.trim() !== '') total++
    }
    await ctx.report(0, total)
    let processed = 0
    let lineNo = 0
    for await (const line of createInterface({ input: ctx.open(), crlfDelay: Infinity })) {
      lineNo++
      if (line.trim() === '') continue
      if (line.trim() === 'FAIL') throw new Error(`record on line ${lineNo} is FAIL`)
      await sleep(itemDelayMs, undefined, { signal: ctx.signal })
      processed++
      await ctx.report(processed, total)
    }
    return { records: processed, file: ctx.file.name }
  }
}
