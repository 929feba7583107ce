import t from 'tap'
import { Idempotency } from '../lib/http/create/idempotency'
import { Keys } from '../lib/core/keys'
import { redisFor } from './helpers/index'

// A repeated request that arrives while the first one with its key is still adding its job must
// not answer with that job's id before it exists: the add can still fail.

t.test('a repeated request waits for the first one\'s add, and never names a job that was not made', async (t) => {
  const redis = await redisFor(t)
  const r = redis.client()
  t.teardown(() => r.disconnect())
  const idem = new Idempotency(r, new Keys({ prefix: 'bull', channelPrefix: 'jp' }), 60)

  // The first request claims the key; its add then fails and it gives the key back.
  t.equal(await idem.claim('batch', 'alice', 'k1', 'd', 'job-a'), 'job-a')
  let answered: string | null | undefined
  const second = idem.claim('batch', 'alice', 'k1', 'd', 'job-b').then(id => { answered = id })
  await new Promise(resolve => setTimeout(resolve, 200))
  t.equal(answered, undefined, 'the second request waits while the first is adding its job')
  await idem.release('batch', 'alice', 'k1', 'job-a')
  await second
  t.equal(answered, 'job-b', 'the first job was never made: the second request makes its own')

  // The first request's job is added: the waiting request is answered with it.
  t.equal(await idem.claim('batch', 'alice', 'k2', 'd', 'job-c'), 'job-c')
  const waiting = idem.lookup('batch', 'alice', 'k2', 'd')
  await idem.confirm('batch', 'alice', 'k2', 'job-c')
  t.equal(await waiting, 'job-c')
  t.equal(await idem.lookup('batch', 'alice', 'k2', 'd'), 'job-c', 'later repeats are answered at once')

  // The confirmation was lost, but the job exists: that is done too.
  t.equal(await idem.claim('batch', 'alice', 'k3', 'd', 'job-e'), 'job-e')
  await r.hset('bull:batch:job-e', 'data', '{}')
  t.equal(await idem.lookup('batch', 'alice', 'k3', 'd'), 'job-e')

  await t.rejects(idem.lookup('batch', 'alice', 'k2', 'other'), { statusCode: 422 }, 'another body with the same key')
})
