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
    await ctx.report(0, total, { stage: 'counting', message: `${total} records in ${ctx.file.name}` })
    await ctx.log(`counted ${total} records in ${ctx.file.name}`)
    let processed = 0
    let lineNo = 0
    for await (const line of createInterface({ input: ctx.open(), crlfDelay: Infinity })) {
      lineNo++
      if (line.trim() === '') continue
      if (line.trim() === 'FAIL') {
        await ctx.log(`line ${lineNo}: FAIL, stopping`)
        throw new Error(`record on line ${lineNo} is FAIL`)
      }
      await sleep(itemDelayMs, undefined, { signal: ctx.signal })
      processed++
      await ctx.report(processed, total, { stage: 'processing', message: `record ${processed} of ${total}: ${line.trim().slice(0, 40)}` })
      // A log line every tenth record, relayed live: the page shows them, the logs route serves them.
      if (processed % 10 === 0 || processed === total) await ctx.log(`processed ${processed} of ${total}`)
    }
    return { records: processed, file: ctx.file.name }
  }
}
