import t from 'tap'
import { compareEntryIds, compareVersions, formatVersion, parseVersion } from '../lib/wire/version'

t.test('formatVersion and parseVersion round-trip', async (t) => {
  const rows: Array<[number, string | undefined, string]> = [
    [1, undefined, '1.0-0'],
    [2, '1700000000000-3', '2.1700000000000-3'],
    [12, '5-0', '12.5-0']
  ]
  for (const [attempt, entry, text] of rows) {
    t.equal(formatVersion(attempt, entry), text)
    const parsed = parseVersion(text)
    t.equal(parsed?.attempt, attempt, text)
  }
  for (const bad of [null, 3, '', '1', '1.2', 'a.1-0', '1.1-x', '1.1-0-0']) t.equal(parseVersion(bad), null, `not a version: ${String(bad)}`)
})

t.test('compareVersions orders by stream entry id, the attempt only between equal ids', async (t) => {
  const rows: Array<[string, string, number]> = [
    ['1.5-0', '1.5-0', 0],
    ['1.5-0', '1.5-1', -1],
    ['1.6-0', '1.5-9', 1],
    // A snapshot infers its attempt (a queued job shows its next one): the real attempt's later
    // events must not sort before it.
    ['2.1-0', '1.9-9', -1],
    ['1.9-9', '2.0-0', 1],
    ['2.5-0', '1.5-0', 1],
    // ids compare as numbers, not text
    ['1.10-0', '1.9-0', 1],
    ['junk', '1.0-0', -1],
    ['1.0-0', 'junk', 1],
    ['junk', 'other', 0]
  ]
  for (const [a, b, sign] of rows) t.equal(Math.sign(compareVersions(a, b)), sign, `${a} vs ${b}`)
})

t.test('compareEntryIds orders stream entry ids numerically', async (t) => {
  t.equal(Math.sign(compareEntryIds('10-0', '9-5')), 1)
  t.equal(Math.sign(compareEntryIds('9-5', '9-10')), -1)
  t.equal(compareEntryIds('7-1', '7-1'), 0)
})
