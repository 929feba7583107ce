import { OWNER_FIELD } from './keys'

/**
 * One script reads up to a hundred jobs of one queue (JOBS_PER_SCRIPT, lib/core/snapshot.ts), so
 * each job, where it sits and the stream's last entry id are read at one instant: a relayed event
 * is then newer than the snapshot exactly when its entry id is larger. Every read is O(1) (or O(log N) for the stream's
 * tail): ZSCORE on the sorted sets and EXISTS on the lock, never BullMQ's LPOS over the active or
 * waiting lists, whose cost grows with the queue. One command for many jobs: a storm of
 * subscriptions costs the instance one command to encode and one reply to decode per hundred.
 *
 * KEYS: the queue's completed, failed, delayed, prioritized, waiting-children and events keys.
 * ARGV: '1' to read `data`, a job's hash key without its id (the queue's prefix), the suffixes of
 * its lock and of its cancellation mark, then for each job its id and the owner expected after a
 * '=' (or '' to read it whoever owns it); after a '?' instead, a job of somebody else answers its
 * owner alone (for an access policy to decide). A job's own keys are made in the script from its
 * id: two arguments per job, not five, for the instance to encode and Redis to parse. They share
 * the queue's slot (on a cluster, the queue is hash-tagged), so the script stays on one node.
 *
 * The reply is one JSON text (an array, a row per job, false for Redis's nil): one string for
 * the instance to decode per hundred jobs, not fourteen values per job.
 *
 * Each job's owner is read first, from its own field, in one HMGET with the job's small fields
 * (timestamps, attempts, progress): a waiting or running job costs that, its cancellation mark and
 * nothing else. Only jobs written before the owner field existed pay for decoding their data.
 * When owners are checked, a job of somebody else and one that does not exist stop right there,
 * after the same commands as {@link OWNER_SCRIPT}'s, and both answer false: nothing of the job
 * leaves Redis, and its data, result and error are read only once the check passed.
 */
export const SNAPSHOT_SCRIPT = `
local last = nil
local out = {}
local n = (#ARGV - 4) / 2
local prefix, lockSuffix, cancelSuffix = ARGV[2], ARGV[3], ARGV[4]
for i = 0, n - 1 do
  local id = ARGV[5 + 2 * i]
  local job = prefix .. id
  local cancelKey = job .. cancelSuffix
  local o = redis.call('HMGET', job, '${OWNER_FIELD}', 'timestamp', 'progress', 'finishedOn', 'processedOn', 'ats', 'atm')
  local cancel = redis.call('GET', cancelKey)
  local owner = o[1]
  local data = false
  if not owner and o[2] then
    data = redis.call('HGET', job, 'data')
    local ok, decoded = pcall(cjson.decode, data or '')
    if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then owner = decoded.owner end
  end
  if not owner then owner = cancel end
  local want = ARGV[6 + 2 * i]
  if want ~= '' and (not owner or owner == '' or string.sub(want, 2) ~= owner) then
    if string.sub(want, 1, 1) == '?' and owner and owner ~= '' then out[i + 1] = owner else out[i + 1] = false end
  else
    if ARGV[1] == '1' and not data then data = redis.call('HGET', job, 'data') end
    -- A result and an error only once the job has finished (they can be large).
    local ended = {false, false}
    if o[4] then ended = redis.call('HMGET', job, 'returnvalue', 'failedReason') end
    local where = ''
    -- BullMQ writes finishedOn in the script that adds a job to completed or failed, and
    -- processedOn in the one that takes its lock: without them neither set nor the lock is asked.
    if o[4] and redis.call('ZSCORE', KEYS[1], id) then where = 'completed'
    elseif o[4] and redis.call('ZSCORE', KEYS[2], id) then where = 'failed'
    elseif o[5] and redis.call('EXISTS', job .. lockSuffix) == 1 then where = 'active'
    -- Neither finished nor locked, its hash there: queued, whether it waits in the list, delayed,
    -- prioritized or for its children (the state is the same): the three sets are not asked.
    elseif not o[4] and o[2] then where = ''
    elseif redis.call('ZSCORE', KEYS[3], id) then where = 'delayed'
    elseif redis.call('ZSCORE', KEYS[4], id) then where = 'prioritized'
    elseif redis.call('ZSCORE', KEYS[5], id) then where = 'waiting-children'
    end
    if not last then
      local tail = redis.call('XREVRANGE', KEYS[6], '+', '-', 'COUNT', 1)
      last = '0-0'
      if tail[1] then last = tail[1][1] end
    end
    if ARGV[1] ~= '1' then data = false end
    -- A cancelled job's hash is gone: the attempt it was cancelled in is kept beside the mark.
    local cancelled = false
    if cancel then cancelled = redis.call('GET', cancelKey .. ':attempt') end
    out[i + 1] = {o[3], ended[1], ended[2], o[4], o[5], o[6], o[7], o[2], where, cancel, last, owner, data, cancelled}
  end
end
return cjson.encode(out)
`

/**
 * The owner alone, in one small read, before any other work for a job: a job of somebody else
 * and a job that does not exist then cost the same, so timing tells nothing about job ids.
 */
export const OWNER_SCRIPT = `
local h = redis.call('HMGET', KEYS[1], '${OWNER_FIELD}', 'timestamp')
local mark = redis.call('GET', KEYS[2])
if h[1] then return h[1] end
if h[2] then
  local ok, decoded = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'data') or '')
  if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then return decoded.owner end
end
return mark
`
