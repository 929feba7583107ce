// Runs once after every test file (tap's `after`): the leak check. Whatever a test started and
// did not stop (a server, a browser, a temp directory) is still in the registry: it is stopped and
// removed here, and the run fails naming it.
import { sweep } from '../helpers/tracked'

const found = sweep()
if (found.length > 0) {
  process.stderr.write(`Leak check: the tests left ${found.length} thing(s) behind (now stopped/removed):\n${found.map(l => `  ${l}\n`).join('')}`)
  process.exit(1)
}
process.stdout.write('# leak check: no process or temp directory left by the tests\n')
