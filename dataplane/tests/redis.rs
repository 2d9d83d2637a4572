//! Limits shared through a real `redis-server` (Debian's package; `scripts/test.sh` installs
//! it): two dataplanes count against one Redis, exactly, and the failure policy holds while
//! Redis is down or stalled.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{certs, *};
use http::StatusCode;

/// A `redis-server` on a free loopback port, with no persistence, killed on drop; with
/// `tls`, it speaks only TLS there, with that certificate.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    tls: bool,
    role: Role,
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Alone,
    /// A Redis Cluster node (`--cluster-enabled`).
    ClusterNode,
    /// A replica of the server on this port.
    ReplicaOf(u16),
    /// A Sentinel watching the master on this port, as `mymaster`.
    SentinelOf(u16),
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Redis {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// TLS only, presenting `leaf`; `ca` is what redis-cli trusts.
    async fn start_tls(leaf: &certs::Leaf, ca: &certs::Ca) -> Self {
        Self::start_with(Some((leaf, ca))).await
    }

    async fn start_with(tls: Option<(&certs::Leaf, &certs::Ca)>) -> Self {
        Self::start_node(tls, Role::Alone).await
    }

    async fn start_node(tls: Option<(&certs::Leaf, &certs::Ca)>, role: Role) -> Self {
        let cluster = role == Role::ClusterNode;
        // The port is free when picked; another process could take it before Redis binds
        // it, so a start that fails is retried on another port. A cluster node also binds
        // its bus at port + 10000.
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            if cluster && (port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err()) {
                continue;
            }
            let mut r = Self { child: None, port, dir: tempfile::tempdir().unwrap(), tls: tls.is_some(), role };
            if let Some((leaf, ca)) = tls {
                std::fs::write(r.dir.path().join("redis.crt"), &leaf.crt).unwrap();
                std::fs::write(r.dir.path().join("redis.key"), &leaf.key).unwrap();
                std::fs::write(r.dir.path().join("ca.crt"), &ca.pem).unwrap();
            }
            if r.run().await {
                return r;
            }
        }
        panic!("redis-server did not start on any of 20 ports");
    }

    /// Starts the server on `self.port`; false if it exited (port taken).
    async fn run(&mut self) -> bool {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        if let Role::SentinelOf(master) = self.role {
            // Sentinel rewrites its config file: one of its own, in its directory.
            let conf = self.dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor mymaster 127.0.0.1 {master} 1\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\n"
                ),
            )
            .unwrap();
            cmd.arg(&conf).arg("--sentinel");
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]).arg("--dir").arg(self.dir.path());
        if self.tls {
            let file = |name: &str| self.dir.path().join(name);
            cmd.args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(file("redis.crt"))
                .arg("--tls-key-file")
                .arg(file("redis.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.crt"));
        } else {
            cmd.args(["--port", &port]);
        }
        match self.role {
            Role::ClusterNode => {
                cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
            }
            Role::ReplicaOf(master) => {
                cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
            }
            Role::Alone | Role::SentinelOf(_) => {}
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::time::Instant::now() < deadline {
            if self.cli(&["ping"]) == "PONG" {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if self.tls {
            cmd.arg("--tls").arg("--cacert").arg(self.dir.path().join("ca.crt"));
        }
        let out = cmd.args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP or SIGCONT: a stopped server keeps its connections open and answers nothing,
    /// as an overloaded or partitioned one does.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
    }

    fn keys(&self) -> Vec<String> {
        self.cli(&["--scan", "--pattern", "gatehouse:*"]).lines().map(str::to_owned).collect()
    }
}

/// Three Redis Cluster masters on loopback, sharing the 16384 slots.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    async fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(Redis::start_node(None, Role::ClusterNode).await);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = std::time::Instant::now() + PATIENCE;
        while !nodes.iter().all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok")) {
            assert!(std::time::Instant::now() < deadline, "the cluster never became ok");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { nodes }
    }

    fn url(&self) -> String {
        let first = self.nodes[0].port;
        let others: Vec<String> = self.nodes[1..].iter().map(|n| format!("node=127.0.0.1:{}", n.port)).collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", others.join("&"))
    }

    /// Every gateway key, from every node.
    fn keys(&self) -> Vec<String> {
        self.nodes.iter().flat_map(Redis::keys).collect()
    }
}

/// A master, its replica and a Sentinel watching them.
struct Sentinel {
    master: Redis,
    replica: Redis,
    sentinel: Redis,
}

impl Sentinel {
    async fn start() -> Self {
        let master = Redis::start().await;
        let replica = Redis::start_node(None, Role::ReplicaOf(master.port)).await;
        let sentinel = Redis::start_node(None, Role::SentinelOf(master.port)).await;
        let s = Self { master, replica, sentinel };
        // Ready once the replica is in sync and the Sentinel knows it (a failover needs it).
        let deadline = std::time::Instant::now() + PATIENCE;
        while !(s.replica.cli(&["info", "replication"]).contains("master_link_status:up")
            && s.sentinel.cli(&["sentinel", "replicas", "mymaster"]).contains(&s.replica.port.to_string()))
        {
            assert!(std::time::Instant::now() < deadline, "the replica or the Sentinel never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }

    fn url(&self) -> String {
        format!("redis-sentinel://127.0.0.1:{}?sentinelServiceName=mymaster", self.sentinel.port)
    }

    /// The port of the server the Sentinel names as master now.
    fn master_port(&self) -> String {
        self.sentinel.cli(&["sentinel", "get-master-addr-by-name", "mymaster"]).lines().nth(1).unwrap_or("").to_owned()
    }
}

/// The secret replicas share so that they name keys alike.
fn shared_secret() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key-id-secret");
    std::fs::write(&path, "a secret shared by every replica").unwrap();
    (dir, path)
}

fn redis_args<'a>(redis_url: &'a str, secret: &'a Path, more: &[&'a str]) -> Vec<String> {
    let mut args = vec![format!("--counters={redis_url}"), format!("--key-id-secret-file={}", secret.display())];
    args.extend(more.iter().map(|s| (*s).to_owned()));
    args
}

async fn start(cfg: &ConfigDir, args: &[String]) -> Gatehouse {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Gatehouse::start(cfg.path(), &args).await
}

const AUTH: &str = "  auth: {type: authToken, authToken: {header: X-Api-Key}}\n";

async fn status(gw: &Gatehouse, path: &str, token: &str) -> StatusCode {
    gw.get_with(path, &[("x-api-key", token)]).await.status
}

/// Sends `n` requests alternately to `a` and `b` (each alone would allow the whole limit
/// again) and counts those let through; any answer but 200 or 429 fails the test.
async fn allowed_alternately(a: &Gatehouse, b: &Gatehouse, n: usize, path: &str, token: Option<&str>) -> usize {
    let mut allowed = 0;
    for i in 0..n {
        let gw = if i % 2 == 0 { a } else { b };
        let headers: &[(&str, &str)] = match token {
            Some(t) => &[("x-api-key", t)],
            None => &[],
        };
        match gw.get_with(path, headers).await.status {
            StatusCode::OK => allowed += 1,
            StatusCode::TOO_MANY_REQUESTS => {}
            other => panic!("request {i} to {path}: {other}"),
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dataplanes_sharing_redis_let_exactly_the_limit_through_whichever_gets_the_requests() {
    let redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("keyed", "/keyed/", &up.url(), AUTH),
            api("wide", "/wide/", &up.url(), "  rateLimit: {rate: 7, per: 1h}\n"),
            api("billed", "/billed/", &up.url(), AUTH),
            key("alice", "alice-token", "rate: 5\nper: 1h\naccessRights: [keyed]"),
            key("bob", "bob-token", "quotaMax: 4\nquotaRenewal: 3s\naccessRights: [billed]"),
        ]
        .concat(),
    );
    let args = redis_args(&redis.url(), &secret, &[]);
    let a = start(&cfg, &args).await;
    let b = start(&cfg, &args).await;

    let allowed = allowed_alternately(&a, &b, 12, "/keyed/x", Some("alice-token")).await;
    assert_eq!(allowed, 5, "per-key rate 5/h across two replicas");
    let allowed = allowed_alternately(&a, &b, 12, "/wide/x", None).await;
    assert_eq!(allowed, 7, "API-wide rate 7/h across two replicas");

    // Quota 4 per 3 s window, shared; the window renews on its own.
    let mut allowed = 0;
    let mut last = None;
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = gw.get_with("/billed/x", &[("x-api-key", "bob-token")]).await;
        match r.status {
            StatusCode::OK => allowed += 1,
            StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS => last = Some(r),
            other => panic!("request {i}: {other} {}", r.text()),
        }
    }
    assert_eq!(allowed, 4, "quota 4 across two replicas");
    let refused = last.expect("a refusal");
    let refused_status = refused.status;
    let others =
        retry_until(&refused, StatusCode::OK, async || b.get_with("/billed/x", &[("x-api-key", "bob-token")]).await)
            .await;
    let _ = (others, refused_status);
    let left = b.get_with("/billed/x", &[("x-api-key", "bob-token")]).await;
    assert_eq!(left.status, StatusCode::OK, "a renewed window allows the quota again");
    assert_eq!(left.header("x-ratelimit-remaining"), "2", "{:?}", left.headers);

    // Counters hold the keyed id, never the key or its plain hash.
    let keys = redis.keys();
    assert!(keys.iter().any(|k| k.starts_with("gatehouse:rate:default/key/")), "{keys:?}");
    assert!(keys.iter().any(|k| k == "gatehouse:rate:default/wide/api"), "{keys:?}");
    let plain = hex::encode(<sha2::Sha256 as sha2::Digest>::digest("alice-token"));
    assert!(!keys.iter().any(|k| k.contains(&plain) || k.contains("alice-token")), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_clients_across_two_replicas_get_exactly_the_limit() {
    let redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[api("a", "/a/", &up.url(), AUTH), key("k", "k-token", "rate: 50\nper: 1h\naccessRights: [a]")].concat(),
    );
    let args = redis_args(&redis.url(), &secret, &[]);
    let gws = std::sync::Arc::new([start(&cfg, &args).await, start(&cfg, &args).await]);
    let mut clients = Vec::new();
    for c in 0..64 {
        let gws = gws.clone();
        clients.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..2 {
                match status(&gws[(c + i) % 2], "/a/x", "k-token").await {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("client {c}: {other}"),
                }
            }
            ok
        }));
    }
    let mut allowed = 0;
    for c in clients {
        allowed += c.await.unwrap();
    }
    assert_eq!(allowed, 50, "128 concurrent requests, limit 50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_expire_after_their_window() {
    let redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("a", "/a/", &up.url(), AUTH),
            key("k", "k-token", "rate: 10\nper: 1s\nquotaMax: 100\nquotaRenewal: 2s\naccessRights: [a]"),
        ]
        .concat(),
    );
    let gw = start(&cfg, &redis_args(&redis.url(), &secret, &[])).await;
    assert_eq!(status(&gw, "/a/x", "k-token").await, StatusCode::OK);
    let keys = redis.keys();
    assert_eq!(keys.len(), 2, "a rate and a quota counter: {keys:?}");
    for k in &keys {
        let ttl: i64 = redis.cli(&["pttl", k]).parse().unwrap();
        assert!(ttl > 0 && ttl <= 2_000, "{k} has TTL {ttl} ms, not within its window");
    }
    gw.wait_until("the counters to expire", async || redis.keys().is_empty()).await;
}

fn limited_and_free(up: &Upstream) -> ConfigDir {
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("limited", "/limited/", &up.url(), AUTH),
            api("free", "/free/", &up.url(), ""),
            key("k", "k-token", "rate: 3\nper: 1h\naccessRights: [limited]"),
        ]
        .concat(),
    );
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_waiting_on_a_stalled_redis_hold_no_worker_and_count_exactly_once_it_answers() {
    let redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = limited_and_free(&up);
    // A long timeout, so that checks waiting on the stalled Redis are still waiting while
    // the test looks at everything else.
    let gw = start(&cfg, &redis_args(&redis.url(), &secret, &["--counters-timeout=60s"])).await;
    assert_eq!(status(&gw, "/limited/x", "k-token").await, StatusCode::OK);

    // Stalled: its connections stay open and nothing answers, as with an overloaded or
    // partitioned server. The gateway runs two workers; if waiting checks held them, the
    // free API could not answer until the checks gave up.
    redis.signal("-STOP");
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let url = gw.url("/limited/x");
            tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
                let req = http::Request::get(url).header("x-api-key", "k-token").body(Default::default()).unwrap();
                client.request(req).await.unwrap().status()
            })
        })
        .collect();
    gw.wait_until("the eight checks to wait on the stalled Redis", async || {
        gw.metric("gatehouse_counter_store_checks_in_flight").await == 8.0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(gw.get("/free/x").await.status, StatusCode::OK);
    }
    assert!(waiting.iter().all(|w| !w.is_finished()), "a limited request finished while Redis was stalled");
    redis.signal("-CONT");
    let mut allowed = 0;
    for w in waiting {
        if w.await.unwrap() == StatusCode::OK {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 2, "with Redis back, the stalled checks are counted exactly (3 per hour, 1 used)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_limited_requests_pass_by_default_and_limits_return_with_it() {
    let mut redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = limited_and_free(&up);
    let gw = start(&cfg, &redis_args(&redis.url(), &secret, &[])).await;
    assert_eq!(status(&gw, "/limited/x", "k-token").await, StatusCode::OK);

    // Down: the default policy (open) lets limited requests through, uncounted, and says so.
    redis.stop();
    for _ in 0..5 {
        assert_eq!(status(&gw, "/limited/x", "k-token").await, StatusCode::OK, "fail open");
        assert_eq!(gw.get("/free/x").await.status, StatusCode::OK);
    }
    gw.wait_for_log_containing("counter store unavailable").await;
    assert!(gw.metric("gatehouse_counter_store_errors_total").await >= 5.0);

    // Back (empty, as after a failover): limits count again without a restart.
    assert!(redis.run().await, "restart redis-server on its port");
    gw.wait_until("limits to be enforced again", async || {
        status(&gw, "/limited/x", "k-token").await == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
    assert!(!redis.keys().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_while_redis_is_down_serves_and_counts_once_redis_comes_up() {
    let mut redis = Redis::start().await;
    redis.stop();
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = limited_and_free(&up);
    let gw = start(&cfg, &redis_args(&redis.url(), &secret, &[])).await;
    gw.wait_for_log_containing("serving anyway").await;
    assert_eq!(status(&gw, "/limited/x", "k-token").await, StatusCode::OK, "fail open");
    assert_eq!(gw.get("/free/x").await.status, StatusCode::OK);

    // The first connection failed; the client keeps trying, and limits hold once it is up.
    assert!(redis.run().await, "start redis-server on its port");
    gw.wait_until("limits to be enforced", async || {
        status(&gw, "/limited/x", "k-token").await == StatusCode::TOO_MANY_REQUESTS
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policy_closed_refuses_limited_requests_while_redis_is_down_and_other_apis_keep_serving() {
    let mut redis = Redis::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("limited", "/limited/", &up.url(), "  rateLimit: {rate: 100, per: 1s}\n"),
            api("free", "/free/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = start(&cfg, &redis_args(&redis.url(), &secret, &["--counters-failure=closed"])).await;
    assert_eq!(gw.get("/limited/x").await.status, StatusCode::OK);
    redis.stop();
    let r = gw.get("/limited/x").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    assert_eq!(gw.get("/free/x").await.status, StatusCode::OK);
    assert!(redis.run().await);
    gw.wait_until("limited requests to pass again", async || gw.get("/limited/x").await.status == StatusCode::OK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counters_need_a_shared_key_id_secret_and_a_valid_url() {
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", "http://127.0.0.1:1", ""));
    let run = |args: &[&str]| {
        let out = Command::new(binary())
            .args(["--listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0", "--config"])
            .arg(cfg.path())
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--counters=redis://127.0.0.1:1"]);
    assert!(err.contains("--counters redis needs --key-id-secret-file"), "{err}");
    let (_s, secret) = shared_secret();
    let secret = format!("--key-id-secret-file={}", secret.display());
    let err = run(&["--counters=redis://user:hunter2@[bad", &secret]);
    assert!(err.contains("--counters"), "{err}");
    assert!(!err.contains("hunter2"), "the password is printed: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_counts_across_replicas_and_a_wrong_ca_is_a_store_failure() {
    let ca = certs::Ca::new();
    let redis = Redis::start_tls(&ca.leaf(&["127.0.0.1"]), &ca).await;
    let (dir, secret) = shared_secret();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let wrong_file = dir.path().join("other-ca.pem");
    std::fs::write(&wrong_file, &certs::Ca::new().pem).unwrap();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("keyed", "/keyed/", &up.url(), AUTH),
            api("free", "/free/", &up.url(), ""),
            key("alice", "alice-token", "rate: 5\nper: 1h\naccessRights: [keyed]"),
        ]
        .concat(),
    );
    let ca_arg = format!("--counters-ca-file={}", ca_file.display());
    let args = redis_args(&redis.url(), &secret, &[&ca_arg]);
    let a = start(&cfg, &args).await;
    let b = start(&cfg, &args).await;
    let allowed = allowed_alternately(&a, &b, 12, "/keyed/x", Some("alice-token")).await;
    assert_eq!(allowed, 5, "per-key rate 5/h across two replicas, over TLS");
    assert!(redis.keys().iter().any(|k| k.starts_with("gatehouse:rate:default/key/")));

    // A gateway that does not trust the server's certificate cannot count: the failure
    // policy answers, and APIs without limits are untouched.
    let wrong = format!("--counters-ca-file={}", wrong_file.display());
    let c = start(&cfg, &redis_args(&redis.url(), &secret, &[&wrong, "--counters-failure=closed"])).await;
    assert_eq!(status(&c, "/keyed/x", "alice-token").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(c.get("/free/x").await.status, StatusCode::OK);
    assert!(c.metric("gatehouse_counter_store_errors_total").await >= 1.0);
}

#[tokio::test]
async fn a_ca_file_without_a_tls_url_or_that_holds_no_certificate_is_refused_at_start() {
    let (dir, secret) = shared_secret();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", "http://127.0.0.1:1", ""));
    for (url, why) in [
        ("redis://127.0.0.1:1", "only a rediss:// URL (TLS) uses it"),
        ("rediss://127.0.0.1:1", "holds no usable CA certificate"),
    ] {
        let out = Command::new(binary())
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
            .arg(cfg.path())
            .args(redis_args(url, &secret, &[]))
            .arg(format!("--counters-ca-file={}", junk.display()))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}: started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--counters-ca-file") && err.contains(why), "{url}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_counts_exactly_across_replicas_with_keys_on_every_node() {
    let cluster = Cluster::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let names = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    let mut docs = vec![
        api("keyed", "/keyed/", &up.url(), AUTH),
        api("wide", "/wide/", &up.url(), "  rateLimit: {rate: 9, per: 1h}\n"),
    ];
    for n in names {
        docs.push(key(n, &format!("{n}-token"), "rate: 3\nper: 1h\naccessRights: [keyed]"));
    }
    cfg.write("apis.yaml", &docs.concat());
    let args = redis_args(&cluster.url(), &secret, &[]);
    let gws = std::sync::Arc::new([start(&cfg, &args).await, start(&cfg, &args).await]);

    // All keys at once, from 32 clients across both replicas: batches mix hash slots.
    let mut clients = Vec::new();
    for c in 0..32usize {
        let gws = gws.clone();
        clients.push(tokio::spawn(async move {
            let token = format!("k{}-token", c % 8);
            let mut ok = 0;
            for i in 0..2 {
                match status(&gws[(c + i) % 2], "/keyed/x", &token).await {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("client {c}: {other}"),
                }
            }
            (c % 8, ok)
        }));
    }
    let mut per_key = [0; 8];
    for c in clients {
        let (k, ok) = c.await.unwrap();
        per_key[k] += ok;
    }
    assert_eq!(per_key, [3; 8], "rate 3/h for each key, 8 requests each, across two replicas");
    let allowed = allowed_alternately(&gws[0], &gws[1], 14, "/wide/x", None).await;
    assert_eq!(allowed, 9, "API-wide rate 9/h across two replicas");

    let keys = cluster.keys();
    assert_eq!(keys.iter().filter(|k| k.starts_with("gatehouse:rate:default/key/")).count(), 8, "{keys:?}");
    let holding = cluster.nodes.iter().filter(|n| !n.keys().is_empty()).count();
    assert!(holding >= 2, "counters spread over the cluster's nodes: {holding} of 3 hold some");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_sentinel_limits_are_exact_across_replicas_and_hold_again_after_a_failover() {
    let redis = Sentinel::start().await;
    let (_s, secret) = shared_secret();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "apis.yaml",
        &[
            api("keyed", "/keyed/", &up.url(), AUTH),
            key("before", "before-token", "rate: 5\nper: 1h\naccessRights: [keyed]"),
            key("after", "after-token", "rate: 5\nper: 1h\naccessRights: [keyed]"),
            key("probe", "probe-token", "rate: 1\nper: 1s\naccessRights: [keyed]"),
        ]
        .concat(),
    );
    let args = redis_args(&redis.url(), &secret, &["--counters-failure=closed"]);
    let (a, b) = (start(&cfg, &args).await, start(&cfg, &args).await);
    assert_eq!(allowed_alternately(&a, &b, 8, "/keyed/x", Some("before-token")).await, 5);
    assert!(!redis.master.keys().is_empty(), "the counters are on the master the Sentinel names");

    // The Sentinel promotes the replica; the gateways follow it to the new master.
    let old = redis.master.port.to_string();
    assert!(redis.sentinel.cli(&["sentinel", "failover", "mymaster"]).contains("OK"));
    let deadline = std::time::Instant::now() + PATIENCE;
    while redis.master_port() == old || !redis.replica.cli(&["role"]).starts_with("master") {
        assert!(std::time::Instant::now() < deadline, "the failover never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counting works on both gateways again when a rate of 1/s lets one of two requests
    // through; a failed check is a 503 here (failure policy closed).
    for gw in [&a, &b] {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let (first, second) =
                (status(gw, "/keyed/x", "probe-token").await, status(gw, "/keyed/x", "probe-token").await);
            if (first, second) == (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "limits never worked again after the failover: {first} {second}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(allowed_alternately(&a, &b, 8, "/keyed/x", Some("after-token")).await, 5, "exact after the failover");
    assert!(redis.replica.keys().iter().any(|k| k.contains("/key/")), "the new master holds the counters");
}
