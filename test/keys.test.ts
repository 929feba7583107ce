import t from 'tap'
import { clusterKeyProblem, Keys } from '../lib/core/keys'
import { hashTag, slotOf } from '../lib/core/slot'
import { parseRelay, relayMessage } from '../lib/wire/relay'

t.test('channels: hash-tagged on the job, read back', async (t) => {
  const keys = new Keys({ prefix: '{bull}', channelPrefix: 'jp' })
  const channel = keys.channel('batch', 'j-1')
  t.equal(channel, 'jp:batch:{j-1}')
  t.same(Keys.parseChannel(channel), { queue: 'batch', jobId: 'j-1' })
  t.equal(Keys.parseChannel('jp:batch:j-1'), null, 'no tag')
  t.equal(Keys.parseChannel('{j-1}'), null, 'no queue')
  t.equal(keys.cancel('batch', 'j-1'), '{bull}:batch:j-1:jp-cancel', 'the mark sits next to the job')
  t.equal(slotOf(keys.cancel('batch', 'j-1')), slotOf(keys.job('batch', 'j-1')), 'in the job\'s slot')
  t.equal(slotOf(keys.queueKey('batch', 'events')), slotOf(keys.job('batch', 'j-1')), 'and the queue\'s')
})

t.test('cluster slots match Redis (CLUSTER KEYSLOT), hash tags as Redis reads them', async (t) => {
  const rows: Array<[string, number]> = [['foo', 12182], ['somekey', 11058], ['{user1000}.following', 3443], ['{user1000}.followers', 3443], ['foo{}{bar}', 8363], ['foo{{bar}}zap', 4015], ['foo{bar}{zap}', 5061]]
  for (const [key, slot] of rows) t.equal(slotOf(key), slot, key)
  t.equal(hashTag('a{}b'), 'a{}b', 'an empty tag hashes the whole key')
  t.equal(hashTag('a{b'), 'a{b', 'an open brace alone hashes the whole key')
})

t.test('the register-time check names the fix', async (t) => {
  t.equal(clusterKeyProblem('{bull}', ['batch', 'dataset']), null)
  t.equal(clusterKeyProblem('bull', ['{batch}']), null, 'tagged queue names do too')
  t.match(clusterKeyProblem('bull', ['batch', '{ok}']), /queue "batch" carry no hash tag: set `prefix: '\{bull\}'`/)
})

t.test('relay codec: entry ids ride along; malformed messages are null', async (t) => {
  t.same(parseRelay(relayMessage('5-1', ['event', 'completed', 'jobId', 'j'])?.payload ?? ''), { v: 2, e: 'completed', t: 5, i: '5-1' })
  t.same(parseRelay('{"e":"resync","t":1,"c":"trim"}'), { v: 1, e: 'resync', t: 1, c: 'trim' }, 'no `v`: version 1')
  t.match(parseRelay('{"e":"progress","i":"bad"}'), { e: 'progress' }, 'a bad id is left out')
  t.notOk(parseRelay('{"e":"progress","i":"bad"}')?.i)
  t.equal(parseRelay('nope'), null)
  t.equal(parseRelay('3'), null)
  t.equal(parseRelay('{"t":1}'), null)
})
