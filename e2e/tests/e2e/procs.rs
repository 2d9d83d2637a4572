//! The real binaries as local processes (there is no kubelet: the tests run the controller
//! and dataplanes the way the chart's pods would), and an upstream on loopback.

use std::{
    convert::Infallible,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    client::legacy::Client as HttpClient,
    rt::{TokioExecutor, TokioIo},
};

use crate::cluster::repo_root;

/// How long the tests wait for anything to happen.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// `target/<profile>/<name>`, built once per process. The profile is `debug`, or
/// `release` with `GATEHOUSE_E2E_RELEASE=1` (the benchmarks).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let release = std::env::var_os("GATEHOUSE_E2E_RELEASE").is_some();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut args = vec!["build", "--quiet", "-p", "gatehouse-controller", "-p", "gatehouse-dataplane", "--bins"];
        if release {
            args.push("--release");
        }
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args(args)
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("cargo build failed: {status}")) }
    });
    if let Err(e) = built {
        panic!("building the binaries: {e}");
    }
    let dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
    dir.join(if release { "release" } else { "debug" }).join(name)
}

/// A running binary; killed when dropped. Its JSON log lines are kept.
pub struct Proc {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    /// The listen and admin addresses it logged at start.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The TLS listen address, for a dataplane given `--tls-listen`.
    pub tls: Option<SocketAddr>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `bin` with `args` and waits for the log line `starting` that names its
    /// `listen` and `admin` addresses.
    pub fn start(bin: &str, args: &[String], env: &[(&str, &Path)], starting: &str) -> Self {
        let mut cmd = Command::new(binary(bin));
        cmd.args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("{bin}: no stderr"));
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (l, starting) = (logs.clone(), starting.to_owned());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(&starting) {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let addr = |k: &str| v["fields"][k].as_str().and_then(|s| s.parse::<SocketAddr>().ok());
                    if let (Some(a), Some(b)) = (addr("listen"), addr("admin")) {
                        let _ = tx.send((a, b, addr("tls_listen")));
                    }
                }
                l.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let Ok((addr, admin, tls)) = rx.recv_timeout(PATIENCE) else {
            panic!("{bin} did not start; logs:\n{}", logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n"));
        };
        Self { child, logs, addr, admin, tls }
    }

    /// Resident memory, from /proc (0 if unreadable).
    #[allow(dead_code, reason = "for the benchmarks")]
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = get(&format!("http://{}/metrics", self.admin), &[]).await.map(|r| r.1).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or(0.0)
    }
}

/// A controller watching one namespace, as the chart runs it (one replica).
pub fn controller(kubeconfig: &Path, ns: &str, identity: &str) -> Proc {
    controller_of(kubeconfig, &[ns], identity)
}

/// A controller watching several namespaces; its Lease and dataplane ServiceAccount are in
/// the first.
pub fn controller_of(kubeconfig: &Path, namespaces: &[&str], identity: &str) -> Proc {
    controller_with(kubeconfig, namespaces, identity, &[])
}

/// `controller_of` with more flags.
pub fn controller_with(kubeconfig: &Path, namespaces: &[&str], identity: &str, extra: &[String]) -> Proc {
    let home = namespaces.first().copied().unwrap_or("default");
    let mut args = [
        "--listen=127.0.0.1:0",
        "--admin-listen=127.0.0.1:0",
        "--log-format=json",
        &format!("--namespace={}", namespaces.join(",")),
        &format!("--lease-namespace={home}"),
        &format!("--identity={identity}"),
        &format!("--allowed-service-account={home}:dataplane"),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(extra);
    Proc::start("gatehouse-controller", &args, &[("KUBECONFIG", kubeconfig)], "gatehouse controller starting")
}

/// A dataplane subscribed to `controller`, with its own state and plugin directories.
pub fn dataplane(controller: SocketAddr, token: &Path, state: &Path, node: &str) -> Proc {
    dataplane_with(&format!("http://{controller}"), token, state, node, &[])
}

/// A dataplane subscribed to the controller at `url`, with more flags.
pub fn dataplane_with(url: &str, token: &Path, state: &Path, node: &str, extra: &[String]) -> Proc {
    let mut args = vec![
        "--listen=127.0.0.1:0".to_owned(),
        "--admin-listen=127.0.0.1:0".to_owned(),
        "--log-format=json".to_owned(),
        format!("--controller={url}"),
        format!("--token-file={}", token.display()),
        format!("--state-dir={}", state.join("state").display()),
        format!("--plugin-dir={}", state.join("plugins").display()),
        format!("--node-name={node}"),
    ];
    args.extend_from_slice(extra);
    Proc::start("gatehouse-dataplane", &args, &[], "gatehouse dataplane starting")
}

/// GET with headers: the status and body, or the connection error.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, String), String> {
    fetch(url, headers).await.map(|(status, _, body)| (status, body))
}

/// GET with headers: the status, the response headers and the body.
pub async fn fetch(url: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, http::HeaderMap, String), String> {
    send(http::Method::GET, url, headers, "").await
}

/// A request with a body: the status, headers and body, or the connection error.
pub async fn send(
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
}

/// `(status, reason, message, observedGeneration)` of a condition of a Gatehouse resource.
pub async fn condition<K>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ty: &str,
) -> Result<(String, String, String, i64), String>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let obj = kube::Api::<K>::namespaced(client.clone(), ns).get(name).await.map_err(|e| e.to_string())?;
    let v = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    let conditions = v["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let c =
        conditions.iter().find(|c| c["type"] == ty).ok_or_else(|| format!("{name}: no {ty} yet: {}", v["status"]))?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    Ok((s("status"), s("reason"), s("message"), v["status"]["observedGeneration"].as_i64().unwrap_or(-1)))
}

/// Polls `check` until it holds; panics with `what` and the last observation if it never
/// does. Returns how long it took (reported, never asserted: these machines are noisy).
pub async fn eventually<F, Fut>(what: &str, check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    eventually_for(PATIENCE, what, check).await
}

/// As [`eventually`], with a bound of its own.
pub async fn eventually_for<F, Fut>(patience: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < patience {
        match check().await {
            Ok(()) => return started.elapsed(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {patience:?} waiting for {what}; last: {last}");
}

/// An upstream on loopback answering `upstream <name> <path>`.
pub async fn upstream(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "upstream {name} {}",
                        req.uri().path()
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}
