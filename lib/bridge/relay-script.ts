/**
 * The ordered relay: the bridge's read of a queue's event stream and the PUBLISH of each entry's
 * relay message run as one script in Redis. Scripts run one at a time, and the consumer group
 * hands out entries in stream order, so whatever the number of instances reading, every job's
 * messages leave Redis in stream order: no instance publishes a job's newer event before another
 * instance publishes its older one, and no receiver has to drop a step as stale.
 *
 * The script builds exactly what {@link relayMessage} builds (same set of relayed events, same
 * layout); `test/relay-script.test.ts` compares the two entry by entry.
 *
 * A second consumer group on the stream, the wake group, only wakes a bridge: a blocking read
 * on it (NOACK, one entry) returns when an entry arrives, and hands each entry to one bridge, so
 * an idle event costs one wake-up whatever the number of instances. The script moves the wake
 * group to the stream's end when it read none or several entries (their wake-ups are spent: no
 * bridge wakes for nothing), and to its start when it left entries unread (the next wake-up
 * returns at once). One entry read for one wake-up, the idle case, leaves it where it is.
 */
import { RELAY_VERSION, RELAYED } from '../wire/relay'

const luaSet = (names: Iterable<string>): string => `{${[...names].map(n => `["${n}"]=true`).join(',')}}`

/**
 * KEYS[1] the stream. ARGV: group, consumer, count, wake group, channel head, channel tail, '1'
 * when listeners want every relayed event (else only lifecycle events come back).
 * Returns { entries read, messages published, entries handed back unacknowledged, the last
 * entry id read or '' } (the last id feeds the bridge's StreamFloor).
 */
export const RELAY_SCRIPT = `
local stream, group, consumer, count = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local wake, head, tail, all = ARGV[4], ARGV[5], ARGV[6], ARGV[7] == '1'
local relayed = ${luaSet(RELAYED)}
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', stream, '>')
local entries = reply and reply[1][2] or {}
local acks, back, published = {}, {}, 0
for i = 1, #entries do
  local id, f = entries[i][1], entries[i][2]
  local event, job, data = '', '', nil
  for j = 1, #f, 2 do
    local name = f[j]
    if name == 'event' then event = f[j + 1] elseif name == 'jobId' then job = f[j + 1] elseif name == 'data' then data = f[j + 1] end
  end
  local listen = false
  if job ~= '' and relayed[event] then
    local t = string.sub(id, 1, string.find(id, '-', 1, true) - 1)
    local payload
    if event == 'progress' and data then
      payload = '{"v":${RELAY_VERSION},"e":"progress","t":' .. t .. ',"i":"' .. id .. '","d":' .. data .. '}'
    else
      payload = '{"v":${RELAY_VERSION},"e":"' .. event .. '","t":' .. t .. ',"i":"' .. id .. '"}'
    end
    redis.call('PUBLISH', head .. job .. tail, payload)
    published = published + 1
    listen = all or event ~= 'progress'
  end
  if listen then back[#back + 1] = entries[i] else acks[#acks + 1] = id end
end
if #acks > 0 then redis.call('XACK', stream, group, unpack(acks)) end
if #entries >= count then
  redis.pcall('XGROUP', 'SETID', stream, wake, '0')
elseif #entries ~= 1 then
  redis.pcall('XGROUP', 'SETID', stream, wake, '$')
end
return {#entries, published, back, #entries > 0 and entries[#entries][1] or ''}
`
