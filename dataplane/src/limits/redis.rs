//! Counters in Redis (or Valkey), shared by every dataplane pointed at the same server, so
//! a limit holds across replicas.
//!
//! Each check is one `EVALSHA` of a small Lua script: the script reads, decides and writes
//! in one atomic step on the server, so concurrent checks from any number of replicas
//! cannot race, and it takes the time from the server (`TIME`), so replicas whose clocks
//! disagree still count in one timeline. Every counter key gets a TTL, so keys nobody uses
//! any more go away on their own. Concurrent checks share the pool's connections and are
//! pipelined by the client; there is no read-modify-write round trip.

use std::time::Duration;

use fred::{
    clients::Pool,
    prelude::{ClientLike, Config, LuaInterface, ReconnectPolicy},
    types::{Builder, config::Options, scripts::Script},
};

use super::{Decision, StoreError};

/// GCRA, as the in-memory store: one "theoretical arrival time" per key, in microseconds of
/// the server's clock. `KEYS[1]` the counter, `ARGV[1]` the interval between requests and
/// `ARGV[2]` the window, both in µs. Returns `{1, remaining}` or `{0, retry_after_µs}`.
const RATE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
if tat < now then tat = now end
local next = tat + interval
if next - now > per then
  return {0, next - per - now}
end
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now) / 1000) + 1)
return {1, math.floor((per - (next - now)) / interval)}
";

/// A fixed window that starts with the first request after the previous one ended: the
/// key's TTL is the window. `KEYS[1]` the counter, `ARGV[1]` the maximum and `ARGV[2]` the
/// window in ms. Returns `{1, remaining}` or `{0, retry_after_ms}`. Refused requests are
/// not counted, as in memory.
const QUOTA: &str = r"
local max = tonumber(ARGV[1])
local used = tonumber(redis.call('GET', KEYS[1])) or 0
if used >= max then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    ttl = tonumber(ARGV[2])
  end
  return {0, ttl}
end
used = redis.call('INCR', KEYS[1])
if used == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return {1, max - used}
";

/// Every key the gateway writes starts with this, so its keys are easy to find and never
/// collide with other users of the same server.
pub const PREFIX: &str = "gatehouse:";

/// How long start-up waits for the first connection.
const STARTUP_WAIT: Duration = Duration::from_secs(5);

pub struct RedisStore {
    pool: Pool,
    rate: Script,
    quota: Script,
    /// Per check: bounded by `--counters-timeout`, one attempt, and an immediate error
    /// while the connection is down rather than a wait for the reconnection.
    options: Options,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.write_str("RedisStore(..)")
    }
}

impl RedisStore {
    /// Parses `url` and connects, waiting up to `STARTUP_WAIT` for the server so the first
    /// requests are counted. A server still down after that is the same as one that goes
    /// down later: the failure policy applies until it answers, and the client keeps
    /// reconnecting in the background.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        let config = Config::from_url(url).map_err(|e| StoreError(format!("--counters: {}", e.details())))?;
        let connections = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        let pool = Builder::from_config(config)
            .with_config(|c| c.fail_fast = false)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_secs(1));
                c.internal_command_timeout = timeout.max(Duration::from_secs(1));
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_pool(connections)
            .map_err(|e| StoreError(format!("--counters: {}", e.details())))?;
        drop(pool.connect_pool());
        if tokio::time::timeout(STARTUP_WAIT, pool.wait_for_connect()).await.is_err() {
            tracing::warn!(
                "the counter store did not answer within {STARTUP_WAIT:?}; serving anyway, with the failure policy applying until it does"
            );
        }
        Ok(Self {
            pool,
            rate: Script::from_lua(RATE),
            quota: Script::from_lua(QUOTA),
            options: Options { timeout: Some(timeout), max_attempts: Some(1), fail_fast: true, ..Options::default() },
            timeout,
        })
    }

    pub async fn rate(&self, key: &str, rate: u64, per: Duration) -> Result<Decision, StoreError> {
        let per = micros(per);
        let interval = (per / rate.max(1)).max(1);
        let (allowed, n) = self.run(&self.rate, key, [interval, per]).await?;
        Ok(if allowed { Decision::Allowed { remaining: n } } else { Decision::Denied { retry_after: us(n) } })
    }

    pub async fn quota(&self, key: &str, max: u64, renewal: Duration) -> Result<Decision, StoreError> {
        let window = u64::try_from(renewal.as_millis()).unwrap_or(u64::MAX).max(1);
        let (allowed, n) = self.run(&self.quota, key, [max, window]).await?;
        Ok(if allowed {
            Decision::Allowed { remaining: n }
        } else {
            Decision::Denied { retry_after: Duration::from_millis(n) }
        })
    }

    /// `EVALSHA`, loading the script first when the server does not know it (first use,
    /// or after a restart or a `SCRIPT FLUSH`).
    async fn run(&self, script: &Script, key: &str, args: [u64; 2]) -> Result<(bool, u64), StoreError> {
        // The client's own timeout covers a command once it is written; this one also
        // covers one waiting in the client for a connection that is being re-established.
        tokio::time::timeout(self.timeout, self.eval(script, key, args))
            .await
            .unwrap_or_else(|_| Err(StoreError(format!("redis: no answer within {:?}", self.timeout))))
    }

    async fn eval(&self, script: &Script, key: &str, args: [u64; 2]) -> Result<(bool, u64), StoreError> {
        // While no connection is up (Redis down, reconnecting with backoff) the client would
        // queue the command until one is: fail now instead, so the policy applies at once
        // rather than after the timeout.
        let client = self.pool.next_connected();
        if !client.is_connected() {
            return Err(StoreError("redis: not connected (reconnecting)".to_owned()));
        }
        let client = client.with_options(&self.options);
        let key = format!("{PREFIX}{key}");
        let argv = || args.iter().map(|&a| i64::try_from(a).unwrap_or(i64::MAX)).collect::<Vec<_>>();
        let first: Result<(i64, i64), _> = client.evalsha(&**script.sha1(), key.as_str(), argv()).await;
        let (allowed, n) = match first {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                let lua = script.lua().map(|s| s.to_string()).unwrap_or_default();
                let _: () = client.script_load(lua).await.map_err(store_error)?;
                client.evalsha(&**script.sha1(), key.as_str(), argv()).await.map_err(store_error)?
            }
            other => other.map_err(store_error)?,
        };
        Ok((allowed == 1, u64::try_from(n).unwrap_or(0)))
    }
}

fn store_error(e: fred::error::Error) -> StoreError {
    StoreError(format!("redis: {}", e.details()))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}
