//! Test harness: the real `gatehouse-dataplane` binary, real upstreams on loopback, and a
//! plain HTTP client. Nothing here is a mock.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Channel, Full, combinators::BoxBody};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::sync::Notify;

pub mod certs;
pub mod raw;

pub type Body = BoxBody<Bytes, Infallible>;

/// Waits up to this long for anything the tests wait on (config applied, a line written).
pub const PATIENCE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- upstream

/// An upstream server on loopback. Routes:
/// - `/slow?ms=N`: answers after N ms
/// - `/big?bytes=N`: streams N bytes (`b'x'`) in 64 KiB chunks
/// - `/upload`: reads the whole body, answers with its length
/// - `/echo`: reads the request body, sends it back
/// - `/gate`: streams "one", waits for the test to open the gate, then "two"
/// - `/empty`: 204, no body
/// - `/early`: answers "early" at once and goes on reading the request body after
/// - anything else: JSON with the method, path, query, headers and the upstream's name
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    /// TCP connections accepted, and of those, the ones that ended.
    pub connections: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    pub gate: Arc<Notify>,
    /// Set when `/gate-in` has seen the first chunk of a request body.
    pub first_chunk_seen: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start(name: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Notify::new());
        let first_chunk_seen = Arc::new(Notify::new());
        let (connections, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (h, g, f, c, cl) =
            (hits.clone(), gate.clone(), first_chunk_seen.clone(), connections.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (h, g, f, cl) = (h.clone(), g.clone(), f.clone(), cl.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        h.fetch_add(1, Ordering::SeqCst);
                        upstream_route(name, req, g.clone(), f.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                    cl.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, hits, connections, closed, gate, first_chunk_seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

fn query_num(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix(key)?.strip_prefix('=')?.parse().ok()))
        .unwrap_or(0)
}

async fn upstream_route(
    name: &'static str,
    req: Request<Incoming>,
    gate: Arc<Notify>,
    first_chunk_seen: Arc<Notify>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
            text(format!("slept {name}"))
        }
        "/big" => {
            let total = query_num(&req, "bytes");
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
            tokio::spawn(async move {
                let mut left = total;
                while left > 0 {
                    let n = left.min(64 * 1024);
                    left -= n;
                    if tx.send_data(Bytes::from(vec![b'x'; n as usize])).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(body.boxed())
        }
        "/early" => {
            let mut body = req.into_body();
            tokio::spawn(async move { while let Some(Ok(_)) = body.frame().await {} });
            text("early".to_owned())
        }
        "/empty" => {
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        "/echo" => {
            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            Response::new(Full::new(body).boxed())
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut len = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    len += d.len();
                }
            }
            text(len.to_string())
        }
        "/gate-in" => {
            // Signals once the first chunk arrives; a gateway that buffered the whole body
            // would never deliver it, because the client sends the rest only afterwards.
            let mut body = req.into_body();
            let mut got = Vec::new();
            let mut signalled = false;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    got.extend_from_slice(d);
                    if !signalled {
                        signalled = true;
                        first_chunk_seen.notify_one();
                    }
                }
            }
            text(String::from_utf8_lossy(&got).into_owned())
        }
        "/gate" => {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(2);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"one")).await;
                gate.notified().await;
                let _ = tx.send_data(Bytes::from_static(b"two")).await;
            });
            Response::new(body.boxed())
        }
        _ => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect();
            let body = serde_json::json!({
                "upstream": name,
                "method": req.method().as_str(),
                "path": path,
                "query": req.uri().query(),
                "headers": headers,
            });
            text(body.to_string())
        }
    };
    Ok(resp)
}

fn text(s: String) -> Response<Body> {
    Response::new(Full::new(Bytes::from(s)).boxed())
}

// ---------------------------------------------------------------- gateway

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gatehouse-dataplane"))
}

/// A running `gatehouse-dataplane` process. Ports are chosen by the OS and read back from
/// the gateway's own startup log line, so tests never race for a port.
pub struct Gatehouse {
    child: Child,
    _plugin_cache: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// `--tls-listen`, when the test asked for it.
    pub tls: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    /// What the process wrote to stdout (a Go plugin's fmt.Println, say).
    stdout: Arc<Mutex<Vec<String>>>,
    client: Client<HttpConnector, Body>,
}

impl Drop for Gatehouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gatehouse {
    pub async fn start(config: &Path, extra: &[&str]) -> Self {
        let gw = Self::spawn(config, extra);
        gw.wait_ready().await;
        gw
    }

    /// Starts without waiting for a config to be applied.
    pub fn spawn(config: &Path, extra: &[&str]) -> Self {
        Self::spawn_at(config, "127.0.0.1:0", "127.0.0.1:0", extra)
    }

    /// Starts with the given `--listen` and `--admin-listen` addresses, and waits for a
    /// config to be applied.
    pub async fn start_at(config: &Path, listen: &str, admin: &str, extra: &[&str]) -> Self {
        let gw = Self::spawn_at(config, listen, admin, extra);
        gw.wait_ready().await;
        gw
    }

    fn spawn_at(config: &Path, listen: &str, admin: &str, extra: &[&str]) -> Self {
        let plugin_cache = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(binary());
        cmd.args(["--listen", listen, "--admin-listen", admin, "--log-format", "json", "--config"]).arg(config);
        // A test may choose the plugin directory itself (`--plugin-dir=...` in `extra`).
        if !extra.iter().any(|a| a.starts_with("--plugin-dir")) {
            cmd.arg("--plugin-dir").arg(plugin_cache.path());
        }
        let mut child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .env("GATEHOUSE_WORKERS", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gatehouse-dataplane");
        let stderr = child.stderr.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let o = stdout.clone();
        std::thread::spawn(move || out.lines().map_while(Result::ok).for_each(|l| o.lock().unwrap().push(l)));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let l = logs.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent && line.contains("gatehouse dataplane starting") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let f = &v["fields"];
                    let parse = |k: &str| f[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    let tls = f["tls_listen"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
                    let _ = addr_tx.send((parse("listen"), parse("admin"), tls));
                    sent = true;
                }
                l.lock().unwrap().push(line);
            }
        });
        // A wildcard bind is reached through loopback.
        let local = |a: SocketAddr| {
            if a.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], a.port())) } else { a }
        };
        let (addr, admin, tls) = match addr_rx.recv_timeout(PATIENCE) {
            Ok((addr, admin, tls)) => (local(addr), local(admin), tls.map(local)),
            Err(_) => panic!("gateway did not start; logs:\n{}", logs.lock().unwrap().join("\n")),
        };
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { child, _plugin_cache: plugin_cache, addr, admin, tls, logs, stdout, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(self.url(path)).body(empty()).unwrap()).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut b = Request::get(self.url(path));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).unwrap()).await
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        let resp = self.client.request(req).await.expect("gateway answers");
        Reply::read(resp).await
    }

    pub async fn admin(&self, path: &str) -> Reply {
        self.admin_at(self.admin, path).await
    }

    /// An admin request to `addr`: the admin port reached through another address.
    pub async fn admin_at(&self, addr: SocketAddr, path: &str) -> Reply {
        let req = Request::get(format!("http://{addr}{path}")).body(empty()).unwrap();
        Reply::read(self.client.request(req).await.expect("admin answers")).await
    }

    pub async fn config(&self) -> serde_json::Value {
        self.admin("/config").await.json()
    }

    pub async fn wait_ready(&self) {
        self.wait_until("the gateway to be ready", async || self.admin("/readyz").await.status == StatusCode::OK).await;
    }

    /// Waits until the served config version reaches `v`.
    pub async fn wait_version(&self, v: u64) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..(PATIENCE.as_millis() / 50) {
            last = self.config().await;
            if last["version"].as_u64().unwrap_or(0) >= v {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("config version {v} never applied; last /config: {last}\nlogs:\n{}", self.logs());
    }

    pub async fn wait_until(&self, what: &str, mut cond: impl AsyncFnMut() -> bool) {
        for _ in 0..(PATIENCE.as_millis() / 50) {
            if cond().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}; logs:\n{}", self.logs());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.sigterm();
        self.child.wait().unwrap()
    }

    /// SIGTERM, without waiting for the process to exit.
    pub fn sigterm(&self) {
        Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
    }

    /// The exit status, once the process has exited.
    pub async fn exited(&mut self) -> ExitStatus {
        for _ in 0..(PATIENCE.as_millis() / 50) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not exit; logs:\n{}", self.logs());
    }

    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        let text = self.admin("/metrics").await.text();
        text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok()).unwrap_or(0.0)
    }
}

pub fn empty() -> Body {
    Full::new(Bytes::new()).boxed()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    async fn read(resp: Response<Incoming>) -> Self {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Self { status: parts.status, headers: parts.headers, body }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }

    /// The gateway's own JSON error message.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

// ---------------------------------------------------------------- config

/// A config directory the test writes manifests into.
pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file atomically (write + rename), the way editors and ConfigMaps do.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.path().join(name)).unwrap();
    }
}

pub fn api(name: &str, listen_path: &str, upstream: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: {listen_path}\n  upstream: {{url: \"{upstream}\"}}\n{extra}"
    )
}

/// A gateway (run with `extra` flags) with one API, `/a/`, in front of `up`.
pub async fn gateway(up: &Upstream, extra: &[&str]) -> (ConfigDir, Gatehouse) {
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", &up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), extra).await;
    (cfg, gw)
}

pub fn key(name: &str, token: &str, session: &str) -> String {
    let session: String = session.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, labels: {{gatehouse.dev/key: \"true\"}}}}\nstringData:\n  key: {token}\n  session.yaml: |\n{session}"
    )
}

// ---------------------------------------------------------------- plugins

/// The example plugins and test fixtures, built once per test binary: the Rust ones with
/// cargo (into their own target directory), the C ones with cc against the SDK's header.
pub struct Plugins {
    rust: PathBuf,
    c: PathBuf,
}

impl Plugins {
    /// A Rust example by crate name, e.g. `hit-counter`.
    pub fn rust(&self, krate: &str) -> String {
        self.rust.join(format!("lib{}.so", krate.replace('-', "_"))).display().to_string()
    }

    /// A C plugin or fixture by output name, e.g. `c_add_header_v1`.
    pub fn c(&self, name: &str) -> String {
        self.c.join(format!("lib{name}.so")).display().to_string()
    }
}

pub const RUST_PLUGINS: &[&str] = &[
    "hit-counter",
    "api-name",
    "session-meta",
    "foo-bar-header",
    "response-rewrite",
    "custom-auth",
    "noop",
    "faulty",
    "body-transform",
    "plugin-api",
];

pub fn plugins() -> &'static Plugins {
    static BUILT: std::sync::OnceLock<Plugins> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let target = root.join("target/plugin-tests");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root).args(["build", "--quiet", "--target-dir"]).arg(&target);
        for p in RUST_PLUGINS {
            cmd.args(["-p", p]);
        }
        let status = cmd.status().expect("run cargo build for the example plugins");
        assert!(status.success(), "building the example plugins failed");

        let c = target.join("c");
        std::fs::create_dir_all(&c).unwrap();
        let include = root.join("plugins/sdk/include");
        let cc = |src: &str, out: &str, defines: &[&str]| {
            let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_owned()))
                .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-I"])
                .arg(&include)
                .args(defines)
                .arg(root.join(src))
                .arg("-o")
                .arg(c.join(format!("lib{out}.so")))
                .status()
                .expect("cc must be installed (scripts/test.sh installs gcc)");
            assert!(status.success(), "cc {src} failed");
        };
        cc("plugins/examples/c-add-header/add_header.c", "c_add_header", &[]);
        cc("plugins/examples/c-add-header/add_header.c", "c_add_header_v1", &["-DVERSION=\"v1\""]);
        cc("plugins/examples/c-add-header/add_header.c", "c_add_header_v2", &["-DVERSION=\"v2\""]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_ok", &[]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_abi", &["-DABI_MAJOR=2"]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_unwind", &["-DNOT_PANIC_SAFE"]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_init", &["-DINIT_FAILS"]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_no_decl", &["-DNO_DECLARATION"]);
        cc("dataplane/tests/fixtures/bad_plugin.c", "bad_undefined", &["-DUNDEFINED_SYMBOL"]);
        cc("dataplane/tests/fixtures/big_plugin.c", "big_v1", &["-DVERSION=\"v1\""]);
        cc("dataplane/tests/fixtures/big_plugin.c", "big_v2", &["-DVERSION=\"v2\""]);
        cc("dataplane/tests/fixtures/abi10_plugin.c", "abi10", &[]);
        cc("dataplane/tests/fixtures/analytics_plugin.c", "analytics_fixture", &[]);
        cc("dataplane/tests/fixtures/abi11_plugin.c", "abi11", &["-pthread"]);
        cc("dataplane/tests/fixtures/abi11_plugin.c", "abi11_quiesce", &["-pthread", "-DVERSION=\"quiesce-me\""]);
        cc("dataplane/tests/fixtures/abi11_plugin.c", "go_a", &["-pthread", "-DGO_RUNTIME", "-DVERSION=\"go-a\""]);
        cc("dataplane/tests/fixtures/abi11_plugin.c", "go_b", &["-pthread", "-DGO_RUNTIME", "-DVERSION=\"go-b\""]);
        Plugins { rust: target.join("debug"), c }
    })
}

pub fn plugin(name: &str, path: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: Plugin\nmetadata: {{name: {name}}}\nspec:\n  path: {path}\n{extra}"
    )
}

/// Finds the /config entry for an API.
pub fn api_state(config: &serde_json::Value, id: &str) -> String {
    config["apis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .map_or_else(|| panic!("no API {id} in {config}"), |a| a["state"].as_str().unwrap().to_owned())
}

// ---------------------------------------------------------------- waiting on what the gateway writes
//
// The gateway's log reaches the test through a pipe and a reader thread, and analytics
// through a background writer: a line the gateway wrote a moment ago may not be readable yet.
// Tests wait for it (up to PATIENCE) rather than read once.

impl Gatehouse {
    /// Waits for a log line that satisfies `pred` and returns it.
    pub async fn wait_for_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut found = None;
        self.wait_until(what, async || {
            found = self.logs.lock().unwrap().iter().find(|l| pred(l)).cloned();
            found.is_some()
        })
        .await;
        found.unwrap()
    }

    /// Waits for a log line that contains `text` and returns it.
    pub async fn wait_for_log_containing(&self, text: &str) -> String {
        self.wait_for_log(&format!("a log line containing {text:?}"), |l| l.contains(text)).await
    }
}

/// Waits until the file at `path` holds at least `n` lines, and returns them all.
pub async fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Only whole lines: the writer may be between a record and its newline.
        let lines: Vec<String> =
            text.split_inclusive('\n').filter_map(|l| l.strip_suffix('\n')).map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(std::time::Instant::now() < deadline, "{} has {} lines, not {n}:\n{text}", path.display(), lines.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls `call` until it answers `want`, first waiting out the `Retry-After` of `refused` (a
/// 429) as a client would. Returns how many more refusals came before `want`, so a test can
/// still count every rejection exactly.
pub async fn retry_until(refused: &Reply, want: StatusCode, mut call: impl AsyncFnMut() -> Reply) -> usize {
    let secs: u64 =
        refused.header("retry-after").parse().unwrap_or_else(|_| panic!("no Retry-After: {:?}", refused.headers));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut others = 0;
    loop {
        let r = call().await;
        if r.status == want {
            return others;
        }
        others += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still {} (not {want}) {PATIENCE:?} after Retry-After: {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
