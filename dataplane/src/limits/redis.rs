//! Counters in Redis (or Valkey), shared by every dataplane pointed at the same server, so
//! a limit holds across replicas.
//!
//! Checks run in a small Lua script: it reads, decides and writes in one atomic step on the
//! server, so concurrent checks from any number of replicas cannot race, and it takes the
//! time from the server (`TIME`), so replicas whose clocks disagree still count in one
//! timeline. Every counter key gets a TTL, so keys nobody uses any more go away on their
//! own. There is no read-modify-write round trip.
//!
//! Checks are sent in batches: requests queue theirs, and a batch goes out as one `EVALSHA`
//! (one write, one read and one script run, however many checks) either when the batcher
//! task, woken by the first check of a batch, has let the requests ready to run queue
//! theirs, or at once by the request whose check makes `FLUSH_AT`. Waiting for every ready
//! request alone would send the batch only once the worker had nothing else to do, and the
//! worker would then sit idle for the round trip (measured: 14% of its time, 29 checks
//! per call); at `FLUSH_AT` it goes on serving while Redis answers. The script
//! takes them in order, each as it would alone, so batching changes no count. Without it,
//! every request costs one more write to the Redis socket (the client flushes each command
//! it is given on its own, pipelined or not), about a fifth of what a request costs here.
//! In a cluster, a script may only touch keys of one hash slot: there a batch is one
//! `EVALSHA` per slot.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use fred::{
    clients::{Client, Pool},
    prelude::{ClientLike, Config, LuaInterface, ReconnectPolicy},
    types::{Builder, Key, Value, scripts::Script},
};
use tokio::sync::{Notify, oneshot};

use super::{Decision, StoreError};

/// Every check of a batch, in order, in one atomic step. `KEYS[i]` is check i's counter;
/// `ARGV[1]` holds every check's kind and two numbers as `K A B ` (a letter, two decimals),
/// in the order of `KEYS`: one argument per batch rather than three per check, because
/// encoding and decoding each argument and each answer on its own cost 7% of what a
/// request costs the gateway (measured). The answer is one string too, `ALLOWED N` per
/// check, space-separated.
///
/// Kind `r`, a rate: GCRA, as the in-memory store, with one "theoretical arrival time" per
/// key in microseconds of the server's clock; the numbers are the interval between
/// requests and the window, both in µs; the answer `1 remaining` or `0 retry_after_µs`.
///
/// Kind `q`, a quota: a fixed window that starts with the first request after the previous
/// one ended, the key's TTL being the window; the numbers are the maximum and the window in
/// ms; the answer `1 remaining` or `0 retry_after_ms`. Refused requests are not counted,
/// as in memory.
///
/// `%d`, not `tostring`: Lua would write a large number with an exponent.
const CHECKS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
local i = 0
for kind, a, b in string.gmatch(ARGV[1], '(%a)(%d+) (%d+) ') do
  i = i + 1
  local key = KEYS[i]
  a = tonumber(a)
  b = tonumber(b)
  if kind == 'r' then
    local tat = tonumber(redis.call('GET', key)) or 0
    if tat < now then tat = now end
    local next = tat + a
    if next - now > b then
      out[i] = string.format('0 %d', next - b - now)
    else
      redis.call('SET', key, string.format('%d', next), 'PX', math.ceil((next - now) / 1000) + 1)
      out[i] = string.format('1 %d', math.floor((b - (next - now)) / a))
    end
  else
    local used = tonumber(redis.call('GET', key)) or 0
    if used >= a then
      local ttl = redis.call('PTTL', key)
      if ttl < 0 then
        redis.call('PEXPIRE', key, b)
        ttl = b
      end
      out[i] = string.format('0 %d', ttl)
    else
      used = redis.call('INCR', key)
      if used == 1 or redis.call('PTTL', key) < 0 then
        redis.call('PEXPIRE', key, b)
      end
      out[i] = string.format('1 %d', a - used)
    end
  end
end
return table.concat(out, ' ')
";

/// Every key the gateway writes starts with this, so its keys are easy to find and never
/// collide with other users of the same server.
pub const PREFIX: &str = "gatehouse:";

/// A TLS client config that trusts only the CA certificates in `pem`.
fn tls_trusting(pem: &str) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let fail = |why: String| StoreError(format!("--counters-ca-file: {why}"));
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not PEM certificates: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    if roots.add_parsable_certificates(certs).0 == 0 {
        return Err(fail("holds no usable CA certificate".to_owned()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| fail(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// How long start-up waits for the first connection.
const STARTUP_WAIT: Duration = Duration::from_secs(5);

/// Most checks one script call carries.
const MAX_BATCH: usize = 256;
/// A batch this full goes out at once, sent by the request that filled it.
const FLUSH_AT: usize = 16;

pub struct RedisStore {
    pool: Pool,
    queue: Arc<Queue>,
}

/// Checks waiting for their batch.
struct Queue {
    checks: Mutex<Vec<Check>>,
    /// Wakes the batcher for a batch's first check, and when the store is dropped.
    wake: Notify,
    closed: AtomicBool,
    batches: Batches,
}

impl Queue {
    /// Queues `check`; returns the batch it filled, to be sent now.
    fn push(&self, check: Check) -> Option<Vec<Check>> {
        let mut checks = self.checks.lock().unwrap_or_else(PoisonError::into_inner);
        checks.push(check);
        match checks.len() {
            1 => {
                drop(checks);
                self.wake.notify_one();
                None
            }
            n if n >= FLUSH_AT => Some(std::mem::take(&mut *checks)),
            _ => None,
        }
    }

    fn take(&self) -> Vec<Check> {
        std::mem::take(&mut *self.checks.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.wake.notify_one();
    }
}

/// One check waiting for its batch.
struct Check {
    kind: Kind,
    /// Made once: the script call takes it as it is, and a retry shares it.
    key: Key,
    args: [u64; 2],
    reply: oneshot::Sender<Result<(i64, i64), StoreError>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Rate,
    Quota,
}

impl Kind {
    /// How the script tells them apart.
    fn tag(self) -> u8 {
        match self {
            Kind::Rate => b'r',
            Kind::Quota => b'q',
        }
    }
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
    pub async fn connect(url: &str, timeout: Duration, ca_pem: Option<&str>) -> Result<Self, StoreError> {
        let mut config = Config::from_url(url).map_err(|e| StoreError(format!("--counters: {}", e.details())))?;
        if let Some(pem) = ca_pem {
            if config.tls.is_none() {
                return Err(StoreError("--counters-ca-file: only a rediss:// URL (TLS) uses it".to_owned()));
            }
            config.tls = Some(tls_trusting(pem)?.into());
        }
        let connections = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8);
        let pool = Builder::from_config(config)
            // Keep reconnecting when the first connection fails too (a Redis that is down at
            // start-up); checks do not wait for it: `run` fails them while not connected.
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| p.default_command_timeout = timeout)
            .with_connection_config(|c| {
                c.connection_timeout = timeout.max(Duration::from_secs(1));
                c.internal_command_timeout = timeout.max(Duration::from_secs(1));
                c.max_command_attempts = 1;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .build_pool(connections)
            .map_err(|e| StoreError(format!("--counters: {}", e.details())))?;
        drop(pool.connect_pool());
        match tokio::time::timeout(STARTUP_WAIT, pool.wait_for_connect()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(
                error = %e.details(),
                "the counter store cannot be reached; serving anyway, with the failure policy applying until it can"
            ),
            Err(_) => tracing::warn!(
                "the counter store did not answer within {STARTUP_WAIT:?}; serving anyway, with the failure policy applying until it does"
            ),
        }
        let clustered = pool.next().client_config().server.is_clustered();
        let batches = Batches { pool: pool.clone(), script: Arc::new(Script::from_lua(CHECKS)), clustered, timeout };
        let queue =
            Arc::new(Queue { checks: Mutex::default(), wake: Notify::new(), closed: AtomicBool::new(false), batches });
        tokio::spawn(batcher(queue.clone()));
        Ok(Self { pool, queue })
    }

    pub async fn rate(&self, key: &str, rate: u64, per: Duration) -> Result<Decision, StoreError> {
        let per = micros(per);
        let interval = (per / rate.max(1)).max(1);
        let (allowed, n) = self.run(Kind::Rate, key, [interval, per]).await?;
        Ok(if allowed { Decision::Allowed { remaining: n } } else { Decision::Denied { retry_after: us(n) } })
    }

    pub async fn quota(&self, key: &str, max: u64, renewal: Duration) -> Result<Decision, StoreError> {
        let window = u64::try_from(renewal.as_millis()).unwrap_or(u64::MAX).max(1);
        let (allowed, n) = self.run(Kind::Quota, key, [max, window]).await?;
        Ok(if allowed {
            Decision::Allowed { remaining: n }
        } else {
            Decision::Denied { retry_after: Duration::from_millis(n) }
        })
    }

    /// Queues one check and waits for its answer, which its batch's timeout bounds.
    async fn run(&self, kind: Kind, key: &str, args: [u64; 2]) -> Result<(bool, u64), StoreError> {
        // While no connection is up (Redis down, reconnecting with backoff) a check would
        // wait for one: fail now instead, so the policy applies at once rather than after
        // the timeout.
        if !self.pool.next_connected().is_connected() {
            return Err(StoreError("redis: not connected (reconnecting)".to_owned()));
        }
        let (reply, answer) = oneshot::channel();
        // Not `format!`: its machinery costs several times the copy (measured).
        let check = Check { kind, key: [PREFIX, key].concat().into(), args, reply };
        if let Some(full) = self.queue.push(check) {
            self.queue.batches.send(full);
        }
        // The batch it goes out in is bounded by the timeout: no timer per check.
        let (allowed, n) = match answer.await {
            Err(_) => return Err(StoreError("redis: the check was dropped with its connection".to_owned())),
            Ok(r) => r?,
        };
        Ok((allowed == 1, u64::try_from(n).unwrap_or(0)))
    }
}

/// What sends batches: the batcher task, and a request that filled one.
struct Batches {
    pool: Pool,
    script: Arc<Script>,
    clustered: bool,
    /// Per batch, from its sending to its answer (`--counters-timeout`).
    timeout: Duration,
}

/// Sends what was queued by the time the requests ready to run (when a batch's first check
/// woke it) have run; a batch filled before that has gone out already.
async fn batcher(queue: Arc<Queue>) {
    while !queue.closed.load(Ordering::Relaxed) {
        queue.wake.notified().await;
        tokio::task::yield_now().await;
        let mut checks = queue.take();
        while !checks.is_empty() {
            let rest = checks.split_off(checks.len().min(MAX_BATCH));
            queue.batches.send(checks);
            checks = rest;
        }
    }
}

impl Batches {
    /// One script call for `batch` (in a cluster, one per hash slot), on its own task.
    fn send(&self, batch: Vec<Check>) {
        let client = self.pool.next_connected().clone();
        if self.clustered {
            let mut by_slot: BTreeMap<u16, Vec<Check>> = BTreeMap::new();
            for c in batch {
                by_slot.entry(fred::util::redis_keyslot(c.key.as_bytes())).or_default().push(c);
            }
            for (_, group) in by_slot {
                tokio::spawn(send(client.clone(), self.script.clone(), group, self.timeout));
            }
        } else {
            tokio::spawn(send(client, self.script.clone(), batch, self.timeout));
        }
    }
}

/// One `EVALSHA` for `batch`, loading the script first when the server does not know it
/// (first use, or after a restart or a `SCRIPT FLUSH`); each check gets its two numbers.
async fn send(client: Client, script: Arc<Script>, batch: Vec<Check>, timeout: Duration) {
    let answer = tokio::time::timeout(timeout, evalsha(&client, &script, &batch))
        .await
        .unwrap_or_else(|_| Err(StoreError(format!("redis: no answer within {timeout:?}"))));
    match answer {
        Ok(numbers) if numbers.len() == 2 * batch.len() => {
            for (check, pair) in batch.into_iter().zip(numbers.chunks_exact(2)) {
                let _ = check.reply.send(Ok((pair[0], pair[1])));
            }
        }
        Ok(numbers) => {
            let e = format!("redis: the script answered {} numbers for {} checks", numbers.len(), batch.len());
            for check in batch {
                let _ = check.reply.send(Err(StoreError(e.clone())));
            }
        }
        Err(e) => {
            for check in batch {
                let _ = check.reply.send(Err(e.clone()));
            }
        }
    }
}

async fn evalsha(client: &Client, script: &Script, batch: &[Check]) -> Result<Vec<i64>, StoreError> {
    // Made again for the rare retry rather than cloned for it each time.
    let keys = || batch.iter().map(|c| c.key.clone()).collect::<Vec<Key>>();
    let args = Value::Bytes(checks_argument(batch));
    let sha = &**script.sha1();
    let first: Result<Bytes, _> = client.evalsha(sha, keys(), args.clone()).await;
    let answer = match first {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            let lua = script.lua().map(|s| s.to_string()).unwrap_or_default();
            // In a cluster, on every primary: the next batch may go to another.
            let _: () = client.script_load_cluster(lua).await.map_err(store_error)?;
            client.evalsha(sha, keys(), args).await.map_err(store_error)?
        }
        other => other.map_err(store_error)?,
    };
    numbers(&answer).ok_or_else(|| StoreError("redis: the script's answer is not a list of numbers".to_owned()))
}

/// The script's `ARGV[1]` for `batch`: `K A B ` per check.
fn checks_argument(batch: &[Check]) -> Bytes {
    let mut out = Vec::with_capacity(batch.len() * 24);
    let mut digits = itoa::Buffer::new();
    for c in batch {
        out.push(c.kind.tag());
        for a in c.args {
            // The script reads numbers as doubles; capped as they were when sent as integers.
            out.extend_from_slice(digits.format(a.min(i64::MAX as u64)).as_bytes());
            out.push(b' ');
        }
    }
    out.into()
}

/// The script's answer, space-separated integers (`None` for anything else). By hand, not
/// with `str::parse`: splitting, UTF-8 checks and parsing took 350 instructions a check.
fn numbers(answer: &[u8]) -> Option<Vec<i64>> {
    let mut out = Vec::with_capacity(answer.len() / 3 + 1);
    if answer.is_empty() {
        return Some(out);
    }
    for field in answer.split(|&b| b == b' ') {
        let (negative, digits) = match field {
            [b'-', rest @ ..] => (true, rest),
            _ => (false, field),
        };
        if digits.is_empty() {
            return None;
        }
        let mut n: i64 = 0;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
        }
        out.push(if negative { -n } else { n });
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: Kind, args: [u64; 2]) -> Check {
        Check { kind, key: Key::from("k"), args, reply: oneshot::channel().0 }
    }

    #[test]
    fn a_batch_goes_out_as_one_argument_the_script_s_pattern_reads() {
        let batch = [check(Kind::Rate, [10_000, 1_000_000]), check(Kind::Quota, [u64::MAX, 3_600_000])];
        assert_eq!(&checks_argument(&batch)[..], b"r10000 1000000 q9223372036854775807 3600000 ");
        assert!(CHECKS.contains("'(%a)(%d+) (%d+) '"), "the script reads the format written here");
    }

    #[test]
    fn the_answer_is_read_as_numbers_or_refused() {
        assert_eq!(numbers(b"1 99 0 4500"), Some(vec![1, 99, 0, 4500]));
        assert_eq!(numbers(b""), Some(vec![]));
        assert_eq!(numbers(b"1 x"), None);
        assert_eq!(numbers(b"1  2"), None);
        assert_eq!(numbers(b"0 -3 1 9223372036854775807"), Some(vec![0, -3, 1, i64::MAX]));
        assert_eq!(numbers(b"1 9223372036854775808"), None, "past i64 is refused, not wrapped");
        assert_eq!(numbers(b"1 -"), None);
    }
}
