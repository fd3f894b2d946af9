//! The Lua scripts that make leases and appends atomic in Redis. Every append checks the lease
//! token first (fencing): a node that lost its lease can never append after another took over.

use redis::Script;

/// KEYS: lease, stream. ARGV: lease value, lease ms. Returns {1, 0} when the lease was taken of a
/// topic that has a stream (someone wrote it before), {0, 0} when taken fresh, {-1, ms} when
/// another holds it for `ms` more (unless renewed): the time to try again.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {redis.call('EXISTS', KEYS[2]), 0}
end
return {-1, redis.call('PTTL', KEYS[1])}
";

/// KEYS: lease, stream. ARGV: lease value, lease ms, stream ttl ms. 1: renewed (and the stream
/// kept alive while its topic has a writer, however long it goes unchanged); 0: no longer ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// KEYS: lease. ARGV: lease value. Deletes the lease if still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS: lease, stream. ARGV: lease value, epoch for a new stream, max length, max age ms,
/// kind, envelope, document, json flag, changed-at ms, stream ttl ms.
/// Returns {epoch, seq, entry id}, or nil when the lease is not ours (fenced). The sequence goes
/// on from the stream's last entry, whoever wrote it, so ids never repeat across writers.
const PUBLISH: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return false
end
local epoch = ARGV[2]
local seq = 1
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  for i = 1, #f, 2 do
    if f[i] == 'e' then
      epoch = f[i + 1]
    elseif f[i] == 's' then
      seq = tonumber(f[i + 1]) + 1
    end
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*',
  'e', epoch, 's', string.format('%d', seq), 'k', ARGV[5], 'v', ARGV[6],
  'd', ARGV[7], 'j', ARGV[8], 'c', ARGV[9])
local ms = tonumber(string.match(id, '^(%d+)'))
redis.call('XTRIM', KEYS[2], 'MINID', '~', string.format('%d', ms - tonumber(ARGV[4])))
redis.call('PEXPIRE', KEYS[2], ARGV[10])
return {epoch, seq, id}
";

/// The scripts, hashed once (sent by hash, loaded on first use).
pub(super) struct Scripts {
    pub acquire: Script,
    pub renew: Script,
    pub release: Script,
    pub publish: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
            publish: Script::new(PUBLISH),
        }
    }
}
