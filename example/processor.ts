import { createInterface } from 'node:readline'
import { setTimeout as sleep } from 'node:timers/promises'
import type { JobContext } from '../lib/index'

/** The name of the stream the demo writes one result per record to. */
export const RESULTS_STREAM = 'results'

/** What the demo streams for each record: its number, line, text (cut at 80) and length. */
export interface RecordResult {
  record: number
  line: number
  text: string
  chars: number
}

/**
 * The demo processor: the upload is lines of records; one record every `itemDelayMs`; a record
 * that is exactly `FAIL` fails the job with an error naming its line. Each record's result goes
 * to the job's `results` stream as it is made (the page shows them live and again after a reload).
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
    const results = ctx.stream(RESULTS_STREAM)
    let processed = 0
    let lineNo = 0
    try {
      for await (const line of createInterface({ input: ctx.open(), crlfDelay: Infinity })) {
        lineNo++
        const text = line.trim()
        if (text === '') continue
        if (text === 'FAIL') {
          await ctx.log(`line ${lineNo}: FAIL, stopping`)
          throw new Error(`record on line ${lineNo} is FAIL`)
        }
        await sleep(itemDelayMs, undefined, { signal: ctx.signal })
        processed++
        // The result first, then the count: a page that shows "n of total" has the n results.
        const result: RecordResult = { record: processed, line: lineNo, text: text.slice(0, 80), chars: text.length }
        await results.write(result)
        await ctx.report(processed, total, { stage: 'processing', message: `record ${processed} of ${total}: ${text.slice(0, 40)}` })
        // A log line every tenth record, relayed live: the page shows them, the logs route serves them.
        if (processed % 10 === 0 || processed === total) await ctx.log(`processed ${processed} of ${total}`)
      }
    } finally {
      // Watchers' iterators end with the job anyway; ending the stream says it is complete. A
      // cancelled job is gone, and so is its stream: nothing to end then.
      await results.end().catch(() => {})
    }
    return { records: processed, file: ctx.file.name }
  }
}
