// Runs once before the test files (tap's `before`): an earlier run that was killed outright may
// have left servers or temp directories in the registry; they are stopped and removed here so
// this run's end-of-run check only judges this run.
import { sweep } from '../helpers/tracked'

const found = sweep()
if (found.length > 0) {
  process.stderr.write(`Cleaned up ${found.length} thing(s) an earlier interrupted test run left:\n${found.map(l => `  ${l}\n`).join('')}`)
}
