//! The atomic operations on the shared state, as Lua scripts (each runs
//! alone on the server: a read-modify-write cannot interleave with another
//! replica's). Times are the server's (`TIME`), so replicas' clocks never
//! need to agree.
//!
//! Key layout, every key under `{prefix}:` (README "Running several replicas"):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `rt:{identity}:{account}` | hash `v`, `data` | a delegated account's token record, sealed exactly as its file; `v` = version (unix ms of the write) |
//! | `at:{identity}[:{account}]` | hash `v`, `data` | the current access token, sealed; expires with the token |
//! | `lock:{identity}[:{account}]` | string | the refresh lock: a random owner id, `PX` = `refresh_lock` |
//! | `slots:{protocol}:{mailbox}` | sorted set | session leases: lease id → expiry (ms) |
//! | `slotq:{protocol}:{mailbox}` | sorted set | logins waiting for a slot: waiter id → arrival (ms), FIFO |
//! | `slotqx:{protocol}:{mailbox}` | sorted set | the waiters' heartbeats: waiter id → expiry (ms) |
//! | `fail:ip:{address}`, `fail:user:{username}` | integer | failed logins, expiring `forget_after` after the last |
//! | `keycheck` | string | a constant sealed with the token-store key: replicas with another key notice |

use redis::Script;
use std::sync::LazyLock;

/// The server's clock in milliseconds, at the top of the scripts that need it.
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// KEYS[1] record; ARGV: version, sealed data, ttl ms (0: none). Newest wins.
pub static PUT_NEWER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0') or 0
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'data', ARGV[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) else redis.call('PERSIST', KEYS[1]) end
return 1
",
    )
});

/// KEYS[1] record; ARGV[1] version. Deletes the record only at that version.
pub static DELETE_VERSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if tonumber(redis.call('HGET', KEYS[1], 'v') or '-1') == tonumber(ARGV[1]) then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// KEYS[1] lock; ARGV[1] owner. Deletes only the owner's lock.
pub static UNLOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// KEYS: leases, queue, heartbeats. ARGV: cap, id, lease ms, queue (1/0),
/// heartbeat ms. Drops expired leases and waiters; grants a slot when more
/// are free than waiters stand ahead of `id` (FIFO); else, with queue,
/// keeps `id` in line. Returns -1 when granted, else the number ahead.
pub static SLOT_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        now_ms!(),
        r"
local cap, id, lease, queue, beat = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1', tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, w in ipairs(gone) do
  redis.call('ZREM', KEYS[2], w)
  redis.call('ZREM', KEYS[3], w)
end
local used = redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[2], id)
local ahead = rank or redis.call('ZCARD', KEYS[2])
if cap - used > ahead then
  redis.call('ZADD', KEYS[1], now + lease, id)
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  if rank then
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
  end
  return -1
end
if queue then
  redis.call('ZADD', KEYS[2], 'NX', now, id)
  redis.call('ZADD', KEYS[3], now + beat, id)
  redis.call('PEXPIRE', KEYS[2], lease * 2)
  redis.call('PEXPIRE', KEYS[3], lease * 2)
end
return ahead
",
    ))
});

/// KEYS[1] leases; ARGV: id, lease ms. Extends the lease, re-creating it if
/// the server lost it (a restart without persistence).
pub static SLOT_RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        now_ms!(),
        r"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
",
    ))
});

/// KEYS: leases, queue, heartbeats; ARGV[1] id. A lease given back or a
/// waiter that stopped waiting.
pub static SLOT_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
",
    )
});

/// KEYS[1] leases: the live ones.
pub static SLOT_COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        now_ms!(),
        r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
",
    ))
});

/// KEYS: by address, by username; ARGV[1] forget_after ms. Both counts,
/// each expiring `forget_after` after its last failure.
pub static FAIL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local a = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local b = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return {a, b}
",
    )
});
