/**
 * The history checker at scale (issue 26, item 5): random jobs on 2 API instances of the example
 * behind nginx, on a private redis-server, watched over every transport while each fault is
 * injected once; every watcher's record is checked against the job's true history (the queue's
 * event stream, read as it is written). Prints, per fault, the time from the true final to each
 * watcher's final message (p50 / p99 / max), then the failures by transport × fault.
 *
 *   npx tsx bench/history.ts            # 1,000 jobs, 5,000+ watchers
 *   npx tsx bench/history.ts --quick    # 70 jobs, a few hundred watchers
 *   npx tsx bench/history.ts --jobs-per-round=50 --seed=7 --faults=trim-stream,restart-redis
 *
 * Jobs come in rounds, one per fault (the first with none): a round's jobs are uploaded, the
 * fault strikes once each has reported twice, the next round starts once the fault is over.
 * Every job is watched by its per-job socket, a `jobs` subscription, seed 001's dialect, SSE, the
 * feed of its owner and a webhook; every tenth job also by polling and by the client in Chromium.
 */
import { FAULTS, failureMatrix, failureReport, latencyTable, runHistory, type FaultName } from '../test/helpers/history'

declare global {
  // The page functions of the browser watcher (test/helpers) run in Chromium and name `window`;
  // the bench compiles without the DOM library.
  var window: any
}

const quick = process.argv.includes('--quick')
const arg = (name: string): string | undefined => process.argv.find(a => a.startsWith(`--${name}=`))?.split('=')[1]
const num = (name: string, fallback: number): number => Number(arg(name) ?? fallback)

async function main (): Promise<void> {
  const faults = (arg('faults')?.split(',') ?? FAULTS) as FaultName[]
  const rounds = faults.length + 1
  const jobsPerRound = num('jobs-per-round', quick ? 10 : Math.ceil(1000 / rounds))
  const teardowns: Array<() => unknown> = []
  const t = { teardown: (fn: () => unknown) => { teardowns.push(fn) } }
  const stop = async (): Promise<void> => {
    for (const fn of teardowns.splice(0).reverse()) {
      try { await fn() } catch {}
    }
  }
  process.once('SIGINT', () => { void stop().then(() => process.exit(130)) })
  try {
    const r = await runHistory(t, {
      jobsPerRound,
      faults,
      owners: num('owners', quick ? 4 : 100),
      seed: num('seed', 1),
      stepMs: num('step-ms', 120),
      transports: ['progress', 'jobs', 'scan', 'sse', 'feed', 'webhook'],
      sample: ['polling', 'browser'],
      sampleEvery: 10,
      boundMs: 15_000,
      concurrency: num('concurrency', quick ? 50 : 400),
      log: (line) => process.stdout.write(`${line}\n`)
    })
    const ok = r.verdicts.filter(v => v.ok).length
    process.stdout.write(`\n${r.jobs.size} jobs, ${r.watchers} watchers, ${r.faults.length} faults, ${(r.durationMs / 1000).toFixed(1)} s; ${ok} of ${r.verdicts.length} watchers passed\n\n`)
    process.stdout.write('Time from the true final to the watcher\'s final message:\n\n')
    process.stdout.write(latencyTable(r) + '\n\n')
    process.stdout.write('Checks by transport × fault round:\n\n' + failureMatrix(r) + '\n')
    if (ok < r.verdicts.length) process.stdout.write('\nFailures:\n' + failureReport(r, 60) + '\n')
    process.exitCode = ok === r.verdicts.length ? 0 : 1
  } finally {
    await stop()
  }
}

main().catch((err: Error) => {
  process.stderr.write(`${err.stack ?? err.message}\n`)
  process.exitCode = 2
})
