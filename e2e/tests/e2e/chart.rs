//! The Helm chart (`charts/gatehouse`) the way a user meets it, against the real API server:
//! `helm lint`, the values schema, `helm template | kubectl apply --dry-run=server` (under the
//! `restricted` Pod Security Standard), then the journey of docs/kubernetes.md: build plugins
//! small enough for ConfigMaps, `helm install`, run what the chart deploys, `kubectl apply` the
//! examples in `examples/kubernetes/`, send requests, change config and plugins, `helm upgrade`,
//! `helm uninstall`.
//!
//! There is no kubelet, so the test plays its part, and nothing more:
//! - it reads the Deployments the chart created and starts the real binaries with exactly their
//!   command, arguments and environment, replacing only what cannot work outside a pod: listen
//!   addresses become loopback ports; `fieldRef` environment becomes the pod's name, namespace and
//!   127.0.0.1; the in-cluster config becomes a kubeconfig holding a token of the controller's
//!   ServiceAccount (so the chart's RBAC is what the controller runs with); the projected token
//!   becomes `kubectl create token` for the dataplane's ServiceAccount with the volume's audience;
//!   emptyDir paths become temporary directories; the controller Service's address becomes the
//!   local controller's.
//! - it writes the plugin ConfigMaps into their mount paths as the kubelet does (a timestamped
//!   directory behind the `..data` symlink, swapped atomically on update). For that the test
//!   installs with `plugins.mountPath` set to a temporary directory, and applies
//!   `examples/kubernetes/plugins.yaml` with `/opt/gatehouse/plugins/` replaced by it: the only
//!   edits to what a user runs.
//! - no EndpointSlice controller runs: the test writes the slice of the example `httpbin`
//!   Service, pointing at an upstream of its own on this host's non-loopback address (the API
//!   server refuses loopback endpoints).
//!
//! The chart tests run the controller with `controller.watchNamespace` set: a controller
//! watching every namespace would also compile (and write status for) the other tests' objects.
//! The cluster-wide variant is checked by rendering and server-side dry run.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    io::Write,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use bytes::Bytes;
use gatehouse_crds::{ApiDefinition, Plugin};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Container, Namespace, PodSpec, Secret, Service, ServiceAccount, Volume},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::{
    cluster::{Cluster, cluster, fresh_namespace, install_crds, repo_root},
    procs::{Proc, binary, eventually},
};

const CHART: &str = "charts/gatehouse";
const EXAMPLE_VALUES: &str = "examples/kubernetes/helm/values.yaml";
/// Where the chart mounts plugin volumes by default, and the example Plugins point.
const PLUGIN_MOUNT: &str = "/opt/gatehouse/plugins";
/// The most a ConfigMap may hold.
const CONFIGMAP_MAX: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Running helm, kubectl and compilers

/// Runs `cmd` (with `stdin`), returning stdout, or an error with the command and its stderr.
fn run(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    // Without input, stdin is closed here.
    if let (Some(mut input), Some(data)) = (child.stdin.take(), stdin) {
        input.write_all(data).map_err(|e| format!("{shown}: writing stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{shown}: {e}"))?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        if stderr.contains("Warning:") {
            // Deprecations and Pod Security violations arrive as warnings: none is acceptable.
            return Err(format!("{shown} warned:\n{stderr}"));
        }
        Ok(stdout.into_owned())
    } else {
        Err(format!("{shown} failed ({}):\n{stderr}{stdout}", out.status))
    }
}

fn must(r: Result<String, String>) -> String {
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn helm(c: &Cluster, args: &[&str]) -> Result<String, String> {
    run(Command::new(&c.helm).arg("--kubeconfig").arg(&c.kubeconfig).args(args), None)
}

fn kubectl(c: &Cluster, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
    run(Command::new(&c.kubectl).arg("--kubeconfig").arg(&c.kubeconfig).args(args), stdin)
}

/// `helm template` against the test server's Kubernetes version (helm's offline default is
/// older than the chart's kubeVersion).
async fn template(c: &Cluster, ns: &str, extra: &[&str]) -> Result<String, String> {
    let version = c.client.apiserver_version().await.map_err(|e| e.to_string())?.git_version;
    let mut args = vec!["template", "gatehouse", CHART, "--namespace", ns, "--kube-version", &version];
    args.extend_from_slice(extra);
    helm(c, &args)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn example(name: &str) -> String {
    read(&repo_root().join("examples/kubernetes").join(name))
}

/// The example plugins, built as docs/kubernetes.md says: Rust with the size profile (opt-level
/// "z", fat LTO, one codegen unit, no debug info, stripped; panic stays "unwind"), C with
/// `-Os -s`. Returns the files by ConfigMap name.
fn build_plugins(out: &Path) -> BTreeMap<&'static str, PathBuf> {
    // The gateway binaries first, so that the two cargo builds do not run at once.
    binary("gatehouse-dataplane");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let target = repo_root().join("target/small-plugins");
    must(run(
        Command::new(cargo)
            .args(["build", "--quiet", "--release", "-p", "foo-bar-header", "-p", "response-rewrite", "--target-dir"])
            .arg(&target)
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "z")
            .env("CARGO_PROFILE_RELEASE_LTO", "true")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
            .env("CARGO_PROFILE_RELEASE_PANIC", "unwind"),
        None,
    ));
    std::fs::create_dir_all(out).unwrap_or_else(|e| panic!("{e}"));
    build_c_plugin(out, None);
    let files = BTreeMap::from([
        ("foo-bar-header", target.join("release/libfoo_bar_header.so")),
        ("response-rewrite", target.join("release/libresponse_rewrite.so")),
        ("c-add-header", out.join("libc_add_header.so")),
    ]);
    for path in files.values() {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        eprintln!("plugin {}: {size} bytes", path.display());
        assert!(
            usize::try_from(size).unwrap_or(usize::MAX) < CONFIGMAP_MAX,
            "{} is too big for a ConfigMap",
            path.display()
        );
    }
    files
}

/// `cc -shared -fPIC -Os -s` of the C example, with `-DVERSION="<version>"` if given.
fn build_c_plugin(out: &Path, version: Option<&str>) -> PathBuf {
    std::fs::create_dir_all(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let file = out.join("libc_add_header.so");
    let mut cc = Command::new("cc");
    cc.args(["-shared", "-fPIC", "-Os", "-s", "-I", "plugins/sdk/include", "-o"]).arg(&file);
    if let Some(v) = version {
        cc.arg(format!("-DVERSION=\"{v}\""));
    }
    must(run(cc.arg("plugins/examples/c-add-header/add_header.c"), None));
    file
}

fn sha256_hex(path: &Path) -> String {
    let out = must(run(Command::new("sha256sum").arg(path), None));
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Playing the kubelet

/// What a pod of a Deployment becomes on this machine.
struct Pod<'a> {
    name: String,
    ns: &'a str,
    spec: &'a PodSpec,
    container: &'a Container,
    /// Local directory standing for the pod's emptyDir volumes.
    root: PathBuf,
}

impl<'a> Pod<'a> {
    fn new(deployment: &'a Deployment, index: usize, ns: &'a str, dir: &Path) -> Self {
        let name = format!("{}-local-{index}", deployment.metadata.name.as_deref().unwrap_or_default());
        let spec = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .unwrap_or_else(|| panic!("{name}: no pod template"));
        assert_eq!(spec.containers.len(), 1, "{name}: one container per pod");
        let root = dir.join(&name);
        Self { name, ns, spec, container: &spec.containers[0], root }
    }

    /// The binary the container runs: the file name of its command.
    fn binary(&self) -> String {
        let command = self.container.command.as_deref().unwrap_or_default();
        let first = command.first().unwrap_or_else(|| panic!("{}: the container names no command", self.name));
        Path::new(first).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The container port named `name`.
    fn port(&self, name: &str) -> i32 {
        let ports = self.container.ports.as_deref().unwrap_or_default();
        ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
            .unwrap_or_else(|| panic!("{}: no container port {name}", self.name))
    }

    /// The container's environment as the kubelet would resolve it, with the pod's IP 127.0.0.1.
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for var in self.container.env.as_deref().unwrap_or_default() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), None) => expand(v, &env),
                (None, Some(from)) => {
                    let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                    match field {
                        Some("metadata.name") => self.name.clone(),
                        Some("metadata.namespace") => self.ns.to_owned(),
                        Some("status.podIP") => "127.0.0.1".to_owned(),
                        _ => panic!("{}: env {} from {from:?}: not supported by this test", self.name, var.name),
                    }
                }
                (None, None) => String::new(),
                (Some(_), Some(_)) => panic!("{}: env {} has both value and valueFrom", self.name, var.name),
            };
            env.push((var.name.clone(), value));
        }
        env
    }

    /// The container's arguments, `$(VAR)`-expanded, as `(flag, value)` for `--flag=value`.
    fn args(&self, env: &[(String, String)]) -> Vec<(String, String)> {
        let args = self.container.args.as_deref().unwrap_or_default();
        args.iter()
            .map(|a| {
                let a = expand(a, env);
                match a.split_once('=') {
                    Some((f, v)) => (f.to_owned(), v.to_owned()),
                    None => (a, String::new()),
                }
            })
            .collect()
    }

    /// The volume mounted at the longest prefix of `path`, and the rest of the path.
    fn volume_at(&self, path: &str) -> (&Volume, PathBuf) {
        let mounts = self.container.volume_mounts.as_deref().unwrap_or_default();
        let mount = mounts
            .iter()
            .filter(|m| Path::new(path).starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("{}: {path} is on no volume (the root filesystem is read-only)", self.name));
        assert!(mount.sub_path.is_none(), "{}: subPath mounts are not supported here", self.name);
        let volumes = self.spec.volumes.as_deref().unwrap_or_default();
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("{}: no volume {}", self.name, mount.name));
        let rest = Path::new(path).strip_prefix(&mount.mount_path).map(Path::to_path_buf).unwrap_or_default();
        (volume, rest)
    }

    /// A writable path in the pod: it must be on an emptyDir, which becomes a local directory.
    fn writable(&self, path: &str) -> PathBuf {
        let (volume, rest) = self.volume_at(path);
        assert!(volume.empty_dir.is_some(), "{}: {path} is not on an emptyDir but on {volume:?}", self.name);
        let local = self.root.join(&volume.name).join(rest);
        std::fs::create_dir_all(&local).unwrap_or_else(|e| panic!("{}: {e}", local.display()));
        local
    }

    /// The projected ServiceAccount token at `path`: `kubectl create token` for the pod's
    /// ServiceAccount with the volume's audience, written to a local file.
    fn token(&self, c: &Cluster, path: &str) -> PathBuf {
        let (volume, rest) = self.volume_at(path);
        let sources = volume.projected.as_ref().and_then(|p| p.sources.as_deref()).unwrap_or_default();
        let token = sources
            .iter()
            .filter_map(|s| s.service_account_token.as_ref())
            .find(|t| Path::new(&t.path) == rest)
            .unwrap_or_else(|| panic!("{}: {path} is no projected ServiceAccount token: {volume:?}", self.name));
        let audience = token.audience.as_deref().unwrap_or_else(|| panic!("{}: the token has no audience", self.name));
        let sa = self.spec.service_account_name.as_deref().unwrap_or("default");
        let duration = format!("{}s", token.expiration_seconds.unwrap_or(3600));
        let create = ["-n", self.ns, "create", "token", sa, "--audience", audience, "--duration", &duration];
        let jwt = must(kubectl(c, &create, None));
        let local = self.root.join("token");
        std::fs::create_dir_all(&self.root).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&local, jwt.trim()).unwrap_or_else(|e| panic!("{e}"));
        local
    }

    /// The file a Secret volume holds at `path`: the Secret's item, read from the API server
    /// as the kubelet would, written to a local file.
    fn secret_file(&self, c: &Cluster, path: &str) -> PathBuf {
        let (volume, rest) = self.volume_at(path);
        let secret = volume.secret.as_ref().unwrap_or_else(|| panic!("{}: {path} is on no Secret volume", self.name));
        let name = secret.secret_name.as_deref().unwrap_or_else(|| panic!("{}: {path}: no secretName", self.name));
        let key = secret
            .items
            .iter()
            .flatten()
            .find(|i| Path::new(&i.path) == rest)
            .map_or_else(|| rest.to_string_lossy().into_owned(), |i| i.key.clone());
        let template = format!("go-template={{{{index .data \"{key}\" | base64decode}}}}");
        let value = must(kubectl(c, &["-n", self.ns, "get", "secret", name, "-o", &template], None));
        let local = self.root.join(format!("secret-{name}-{key}"));
        std::fs::create_dir_all(&self.root).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&local, value).unwrap_or_else(|e| panic!("{e}"));
        local
    }

    fn start(&self, args: Vec<String>, env: &[(String, String)], starting: &str) -> Proc {
        let env: Vec<(&str, &Path)> = env.iter().map(|(k, v)| (k.as_str(), Path::new(v.as_str()))).collect();
        eprintln!("{}: {} {}", self.name, self.binary(), args.join(" "));
        Proc::start(&self.binary(), &args, &env, starting)
    }
}

/// Kubernetes' `$(VAR)` expansion, with the variables defined so far.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = s.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// `host:port` in a pod becomes loopback: `port` maps to `local`, other ports to 0 (any).
fn loopback(value: &str, port: i32, local: u16) -> String {
    let addr: SocketAddr = value.parse().unwrap_or_else(|e| panic!("{value:?}: not host:port: {e}"));
    let to = if i32::from(addr.port()) == port { local } else { 0 };
    format!("127.0.0.1:{to}")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().map(|a| a.port()).unwrap_or_else(|e| panic!("{e}"))
}

/// A controller replica as the chart's Deployment runs it; `kubeconfig` authenticates as its
/// ServiceAccount.
fn start_controller(
    c: &Cluster,
    deployment: &Deployment,
    index: usize,
    ns: &str,
    dir: &Path,
    kubeconfig: &Path,
) -> Proc {
    let pod = Pod::new(deployment, index, ns, dir);
    let config = pod.port("config");
    let local = free_port();
    let mut env = pod.env();
    let mut args = Vec::new();
    for (flag, value) in pod.args(&env) {
        let value = match flag.as_str() {
            "--listen" | "--admin-listen" => loopback(&value, config, local),
            "--tls-cert-file" | "--tls-key-file" | "--tls-ca-file" => pod.secret_file(c, &value).display().to_string(),
            _ => value,
        };
        args.push(if value.is_empty() { flag } else { format!("{flag}={value}") });
    }
    for (k, v) in &mut env {
        if k == "GATEHOUSE_ADVERTISE_ADDRESS" {
            *v = loopback(v, config, local);
        }
    }
    env.push(("KUBECONFIG".to_owned(), kubeconfig.display().to_string()));
    let p = pod.start(args, &env, "gatehouse controller starting");
    assert_eq!(i32::from(p.addr.port()), i32::from(local));
    p
}

/// A dataplane replica as the chart's Deployment runs it, subscribed to `controller`.
fn start_dataplane(
    c: &Cluster,
    deployment: &Deployment,
    index: usize,
    ns: &str,
    dir: &Path,
    controller: &Proc,
) -> Proc {
    let pod = Pod::new(deployment, index, ns, dir);
    let env = pod.env();
    let mut args = Vec::new();
    for (flag, value) in pod.args(&env) {
        let value = match flag.as_str() {
            "--listen" | "--admin-listen" | "--tls-listen" => loopback(&value, 0, 0),
            "--controller" => {
                // The chart points at the controller Service; here, at one local replica,
                // still checked by the Service's name.
                let host = format!("{}.{ns}.svc", controller_service(deployment));
                assert!(
                    value.starts_with(&format!("https://{host}:")),
                    "--controller={value}: expected https://{host}:<port>"
                );
                args.push(format!("--controller-server-name={host}"));
                format!("https://{}", controller.addr)
            }
            "--controller-ca-file" => pod.secret_file(c, &value).display().to_string(),
            "--token-file" => pod.token(c, &value).display().to_string(),
            "--key-id-secret-file" => pod.secret_file(c, &value).display().to_string(),
            "--state-dir" | "--plugin-dir" => pod.writable(&value).display().to_string(),
            _ => value,
        };
        args.push(if value.is_empty() { flag } else { format!("{flag}={value}") });
    }
    pod.start(args, &env, "gatehouse dataplane starting")
}

/// The controller Service's name, from the dataplane's `--controller` URL.
fn controller_service(dataplane: &Deployment) -> String {
    let c = dataplane.spec.as_ref().and_then(|s| s.template.spec.as_ref()).map(|s| &s.containers[0]);
    let url = c
        .and_then(|c| c.args.as_ref())
        .and_then(|a| a.iter().find_map(|a| a.strip_prefix("--controller=")))
        .unwrap_or_else(|| panic!("the dataplane has no --controller"));
    let host = url.trim_start_matches("https://").split(':').next().unwrap_or_default();
    host.split('.').next().unwrap_or_default().to_owned()
}

/// Writes a ConfigMap's data into `dir` the way the kubelet's atomic writer does: the files in
/// a new timestamped directory, `..data` swapped to it by rename, one symlink per key.
fn write_configmap_volume(dir: &Path, cm: &ConfigMap) {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in cm.data.iter().flatten() {
        files.insert(k.clone(), v.as_bytes().to_vec());
    }
    for (k, v) in cm.binary_data.iter().flatten() {
        files.insert(k.clone(), v.0.clone());
    }
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let data = dir.join("..data");
    let old = std::fs::read_link(&data).ok();
    let stamp = format!("..{}", std::time::SystemTime::UNIX_EPOCH.elapsed().map(|d| d.as_nanos()).unwrap_or_default());
    std::fs::create_dir(dir.join(&stamp)).unwrap_or_else(|e| panic!("{e}"));
    for (k, v) in &files {
        std::fs::write(dir.join(&stamp).join(k), v).unwrap_or_else(|e| panic!("{e}"));
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&stamp, &tmp).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, &data).unwrap_or_else(|e| panic!("{e}"));
    for k in files.keys() {
        let link = dir.join(k);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(k), &link).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
}

/// Mounts (writes) every ConfigMap volume of the dataplane pods under its mount path, which
/// must be under `allowed` (the test's `plugins.mountPath`). Returns how many it wrote.
async fn mount_configmaps(client: &Client, ns: &str, deployment: &Deployment, allowed: &Path) -> usize {
    let spec = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref()).unwrap_or_else(|| panic!("no pod spec"));
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut n = 0;
    for mount in spec.containers[0].volume_mounts.iter().flatten() {
        let volumes = spec.volumes.as_deref().unwrap_or_default();
        let Some(volume) = volumes.iter().find(|v| v.name == mount.name) else { continue };
        let Some(source) = &volume.config_map else { continue };
        assert!(
            Path::new(&mount.mount_path).starts_with(allowed),
            "{} is outside {}",
            mount.mount_path,
            allowed.display()
        );
        assert_eq!(mount.read_only, Some(true), "plugin volumes are read-only");
        let cm = api.get(&source.name).await.unwrap_or_else(|e| panic!("ConfigMap {}: {e}", source.name));
        write_configmap_volume(Path::new(&mount.mount_path), &cm);
        n += 1;
    }
    n
}

// ---------------------------------------------------------------------------------------------
// An upstream that echoes what it received, on a non-loopback address

/// This host's non-loopback IPv4 address (the API server refuses loopback endpoints).
fn host_ip() -> IpAddr {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| panic!("{e}"));
    for probe in ["10.255.255.255:9", "192.0.2.255:9", "198.51.100.1:9"] {
        if socket.connect(probe).is_ok()
            && let Ok(addr) = socket.local_addr()
            && !addr.ip().is_loopback()
            && !addr.ip().is_unspecified()
        {
            return addr.ip();
        }
    }
    panic!("this host has no non-loopback IPv4 address for an EndpointSlice to point at");
}

/// Answers `{"headers": {name: [values]}, "path": ...}`, as httpbin's /headers does.
async fn echo_upstream(ip: IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
                    for (k, v) in req.headers() {
                        headers.entry(k.as_str().to_owned()).or_default().push(v.to_str().unwrap_or("?").to_owned());
                    }
                    let body = json!({"headers": headers, "path": req.uri().path()}).to_string();
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    resp.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// GET through a dataplane: status, headers, body.
async fn fetch(dp: &Proc, path: &str, headers: &[(&str, &str)]) -> Result<(StatusCode, HeaderMap, String), String> {
    crate::procs::fetch(&format!("http://{}{path}", dp.addr), headers).await
}

/// What the upstream received for `/httpbin/headers` with alice's key: header → values.
async fn upstream_saw(dp: &Proc) -> Result<BTreeMap<String, Vec<String>>, String> {
    match fetch(dp, "/httpbin/headers", &[("authorization", "alice-secret-key")]).await? {
        (StatusCode::OK, _, body) => {
            let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
            if v["path"] != "/headers" {
                return Err(format!("the upstream saw path {}", v["path"]));
            }
            serde_json::from_value(v["headers"].clone()).map_err(|e| e.to_string())
        }
        other => Err(format!("{other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Status

async fn wait_condition<K>(client: &Client, ns: &str, name: &str, ty: &str, message: &str, generation: i64)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let what = format!("{} {name}: {ty}=True \"{message}\", observedGeneration {generation}", K::kind(&()));
    let took = eventually(&what, || async {
        match crate::procs::condition::<K>(client, ns, name, ty).await? {
            (s, _, m, g) if s == "True" && m == message && g == generation => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eprintln!("{what}: after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_and_its_schema_refuses_bad_values() {
    let c = cluster().await;
    must(helm(&c, &["lint", "--strict", CHART]));
    must(helm(&c, &["lint", "--strict", CHART, "-f", EXAMPLE_VALUES]));
    let bad: &[(&[&str], &str)] = &[
        (&["dataplane.replicas=-1"], "/dataplane/replicas"),
        (&["dataplane.service.type=Ingress"], "/dataplane/service/type"),
        (&["controller.replica=3"], "additional properties 'replica' not allowed"),
        (&["logFormat=yaml"], "/logFormat"),
        (&["runAsUser=0"], "/runAsUser"),
        (&["image.dataplane.pullPolicy=Sometimes"], "/image/dataplane/pullPolicy"),
        (&["dataplane.analytics=kafka"], "/dataplane/analytics"),
        (&["dataplane.resources.limits.memory=lots"], "/dataplane/resources/limits/memory"),
        (&["plugins.mountPath=relative/dir"], "/plugins/mountPath"),
        (&["controller.watchNamespace=Not_A_Namespace"], "/controller/watchNamespace"),
        (&["plugins.volumes[0].name=no-source"], "/plugins/volumes/0"),
        (&["plugins.volumes[0].name=Bad_Name", "plugins.volumes[0].configMap.name=x"], "/plugins/volumes/0/name"),
        (&["plugins.volumes[0].name=x", "plugins.volumes[0].configMap=x"], "/plugins/volumes/0/configMap"),
        (&["plugins.volumes[0].name=x", "plugins.volumes[0].image.pullPolicy=Always"], "/plugins/volumes/0/image"),
        (
            &[
                "plugins.volumes[0].name=x",
                "plugins.volumes[0].image.reference=r",
                "plugins.volumes[0].image.pullPolicy=Often",
            ],
            "/plugins/volumes/0/image/pullPolicy",
        ),
        (
            &[
                "plugins.volumes[0].name=x",
                "plugins.volumes[0].configMap.name=x",
                "plugins.volumes[0].secret.secretName=y",
            ],
            "/plugins/volumes/0",
        ),
        (&["dataplane.podDisruptionBudget.maxUnavailable=null"], "/dataplane/podDisruptionBudget"),
        (&["dataplane.drainTimeoutSeconds=0"], "/dataplane/drainTimeoutSeconds"),
        (&["counters.redis.url=http://redis:6379"], "/counters/redis/url"),
        (&["counters.failure=maybe"], "/counters/failure"),
        (&["counters.timeout=soon"], "/counters/timeout"),
        (&["counters.redis.caConfigMap=Not_A_Name"], "/counters/redis/caConfigMap"),
        (&["controller.tls.certManager.enabled=true"], "/controller/tls/certManager/issuerRef/name"),
        (&["controller.tls.certManager.issuerRef.kind=Vault"], "/controller/tls/certManager/issuerRef/kind"),
        (
            &[
                "controller.tls.existingSecret=mine",
                "controller.tls.certManager.enabled=true",
                "controller.tls.certManager.issuerRef.name=ca",
            ],
            "/controller/tls",
        ),
    ];
    for (sets, wanted) in bad {
        let sets: Vec<&str> = sets.iter().flat_map(|s| ["--set", s]).collect();
        let lint = helm(&c, &[&["lint", CHART][..], &sets].concat());
        let lint = lint.err().unwrap_or_else(|| panic!("helm lint accepted {sets:?}"));
        assert!(lint.contains(wanted), "helm lint {sets:?} does not name {wanted}:\n{lint}");
        let rendered = template(&c, "default", &sets).await;
        let rendered = rendered.err().unwrap_or_else(|| panic!("helm template accepted {sets:?}"));
        assert!(rendered.contains(wanted), "helm template {sets:?} does not name {wanted}:\n{rendered}");
    }
    // The drain must end before the kubelet's SIGKILL. The template's `fail` refuses it;
    // `helm lint` only reports a template `fail` as INFO, so rendering is what is checked.
    let sets = ["--set", "dataplane.drainTimeoutSeconds=40"];
    let rendered = template(&c, "default", &sets).await;
    let rendered = rendered.err().unwrap_or_else(|| panic!("helm template accepted {sets:?}"));
    assert!(rendered.contains("must be less than terminationGracePeriodSeconds"), "{rendered}");
    // Without values, helm template and install accept the chart on a server this recent.
    let plain = template(&c, "default", &[]).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(plain.contains("type: kubernetes.io/tls") && !plain.contains("kind: Certificate"), "{plain}");
    // The config stream's certificate from cert-manager, or from a Secret of the user's.
    let issued =
        ["--set", "controller.tls.certManager.enabled=true", "--set", "controller.tls.certManager.issuerRef.name=ca"];
    let issued = template(&c, "default", &issued).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        issued.contains("kind: Certificate") && issued.contains("secretName: gatehouse-controller-tls"),
        "{issued}"
    );
    assert!(issued.contains("- gatehouse-controller.default.svc\n"), "the Service name comes first: {issued}");
    assert!(!issued.contains("type: kubernetes.io/tls"), "cert-manager writes the Secret: {issued}");
    let own = template(&c, "default", &["--set", "controller.tls.existingSecret=my-tls"]).await;
    let own = own.unwrap_or_else(|e| panic!("{e}"));
    assert!(!own.contains("type: kubernetes.io/tls") && !own.contains("kind: Certificate"), "{own}");
    assert!(own.contains("secretName: my-tls"), "{own}");

    // docs/kubernetes.md documents every value.
    let values: Value = serde_saphyr::from_str(&read(&repo_root().join(CHART).join("values.yaml")))
        .unwrap_or_else(|e| panic!("values.yaml: {e}"));
    let docs = read(&repo_root().join("docs/kubernetes.md"));
    let mut undocumented = Vec::new();
    for path in value_paths(&values, "") {
        if !docs.contains(&format!("| `{path}` |")) {
            undocumented.push(path);
        }
    }
    assert!(undocumented.is_empty(), "values missing from the table in docs/kubernetes.md: {undocumented:?}");
}

/// The documented paths of a values tree: leaves, empty maps and lists, and the maps that are
/// one Kubernetes field (`resources`, `updateStrategy`).
fn value_paths(v: &Value, prefix: &str) -> Vec<String> {
    match v.as_object() {
        Some(map) if !map.is_empty() && !["resources", "updateStrategy"].iter().any(|k| prefix.ends_with(k)) => map
            .iter()
            .flat_map(|(k, v)| value_paths(v, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }))
            .collect(),
        _ => vec![prefix.to_owned()],
    }
}

/// The rules of every Role and ClusterRole in `objects`, flattened to
/// `"<Role ns|ClusterRole> <group>/<resource>[/<name>] <verb>"`.
fn rbac_rules(objects: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for o in objects.iter().filter(|o| o["kind"] == "Role" || o["kind"] == "ClusterRole") {
        let scope = match o["metadata"]["namespace"].as_str() {
            Some(ns) => format!("Role {ns}"),
            None => "ClusterRole".to_owned(),
        };
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
        };
        for rule in o["rules"].as_array().into_iter().flatten() {
            let names = strings(&rule["resourceNames"]);
            let names =
                if names.is_empty() { vec![String::new()] } else { names.iter().map(|n| format!("/{n}")).collect() };
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for n in &names {
                        for v in strings(&rule["verbs"]) {
                            out.insert(format!("{scope} {g}/{r}{n} {v}"));
                        }
                    }
                }
            }
        }
    }
    out
}

/// The least privilege the controller needs, as `rbac_rules` spells it.
fn expected_rules(watch: &str, release_ns: &str, lease: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::from([
        "ClusterRole authentication.k8s.io/tokenreviews create".to_owned(),
        format!("Role {release_ns} coordination.k8s.io/leases create"),
        format!("Role {release_ns} coordination.k8s.io/leases/{lease} get"),
        format!("Role {release_ns} coordination.k8s.io/leases/{lease} update"),
    ]);
    let grants = [
        ("gatehouse.dev/apidefinitions", &["get", "list", "watch"][..]),
        ("gatehouse.dev/plugins", &["get", "list", "watch"]),
        ("gatehouse.dev/apidefinitions/status", &["get", "patch", "update"]),
        ("gatehouse.dev/plugins/status", &["get", "patch", "update"]),
        ("/secrets", &["list", "watch"]),
        ("/services", &["list", "watch"]),
        ("discovery.k8s.io/endpointslices", &["list", "watch"]),
        ("events.k8s.io/events", &["create", "patch"]),
    ];
    let scope = if watch.is_empty() { "ClusterRole".to_owned() } else { format!("Role {watch}") };
    for (resource, verbs) in grants {
        for v in verbs {
            out.insert(format!("{scope} {resource} {v}"));
        }
    }
    out
}

/// The pod specs of the Deployments in `objects`, by Deployment name.
fn pod_specs(objects: &[Value]) -> BTreeMap<String, Value> {
    objects
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .map(|o| (o["metadata"]["name"].as_str().unwrap_or_default().to_owned(), o["spec"]["template"]["spec"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_renders_restricted_least_privilege_objects_the_api_server_accepts() {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "chart-render").await;
    // The strictest Pod Security Standard, enforced and warned about (a warning fails `run`).
    let labels = json!({"metadata": {"labels": {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/warn": "restricted",
    }}});
    Api::<Namespace>::all(c.client.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .unwrap_or_else(|e| panic!("labelling {ns}: {e}"));

    let variants: Vec<(&str, Vec<String>)> = vec![
        ("defaults, with the CRDs", vec!["--include-crds".into()]),
        ("the examples' plugin volumes", vec!["-f".into(), EXAMPLE_VALUES.into()]),
        (
            "one watched namespace, a LoadBalancer, PDBs by minAvailable, any volume source",
            [
                format!("controller.watchNamespace={ns}"),
                "dataplane.service.type=LoadBalancer".into(),
                "dataplane.service.nodePort=31080".into(),
                "dataplane.service.externalTrafficPolicy=Local".into(),
                "dataplane.service.loadBalancerSourceRanges[0]=10.0.0.0/8".into(),
                "dataplane.podDisruptionBudget.minAvailable=50%".into(),
                "controller.podDisruptionBudget.enabled=false".into(),
                "plugins.volumes[0].name=shared".into(),
                "plugins.volumes[0].persistentVolumeClaim.claimName=plugins".into(),
                "plugins.volumes[0].subPath=v3".into(),
                "plugins.volumes[1].name=signed".into(),
                "plugins.volumes[1].csi.driver=plugins.example.com".into(),
                "plugins.volumes[2].name=go".into(),
                "plugins.volumes[2].image.reference=registry.example.com/team/go-plugins:v3".into(),
                "plugins.volumes[2].image.pullPolicy=IfNotPresent".into(),
                "dataplane.extraEnv[0].name=RUST_LOG".into(),
                "dataplane.extraEnv[0].value=debug".into(),
                "runAsUser=1000".into(),
                "runAsGroup=1000".into(),
                "counters.redis.existingSecret=gatehouse-redis".into(),
                "counters.redis.caConfigMap=redis-ca".into(),
            ]
            .into_iter()
            .flat_map(|s| ["--set".to_owned(), s])
            .collect(),
        ),
    ];
    for (what, extra) in variants {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let rendered = template(&c, &ns, &extra).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let dry_run = ["apply", "--server-side", "--field-manager=chart-check", "--dry-run=server", "-o", "json"];
        let applied = kubectl(&c, &[&dry_run[..], &["-n", &ns, "-f", "-"]].concat(), Some(rendered.as_bytes()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let list: Value = serde_json::from_str(&applied).unwrap_or_else(|e| panic!("{what}: {e}"));
        let objects = list["items"].as_array().cloned().unwrap_or_default();
        let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        eprintln!("{what}: the API server accepts {} objects: {kinds:?}", objects.len());
        for kind in
            ["Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
        {
            assert!(kinds.contains(kind), "{what}: no {kind}");
        }

        let watch = extra.iter().find_map(|a| a.strip_prefix("controller.watchNamespace=")).unwrap_or_default();
        assert_eq!(rbac_rules(&objects), expected_rules(watch, &ns, "gatehouse-controller"), "{what}: RBAC");

        let pods = pod_specs(&objects);
        assert_eq!(pods.keys().collect::<Vec<_>>(), ["gatehouse-controller", "gatehouse-dataplane"], "{what}");
        for (name, pod) in &pods {
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}: {name}");
            assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}: {name}");
            for ctr in pod["containers"].as_array().into_iter().flatten() {
                let sc = &ctr["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: {name}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: {name}");
                assert_eq!(sc["runAsNonRoot"], true, "{what}: {name}");
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{what}: {name}");
                assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}: {name}");
                for k in ["requests", "limits"] {
                    for r in ["cpu", "memory"] {
                        assert!(ctr["resources"][k][r].is_string(), "{what}: {name}: no resources.{k}.{r}");
                    }
                }
                assert_eq!(ctr["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}: {name}");
                assert_eq!(ctr["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}: {name}");
            }
        }
        let dp = &pods["gatehouse-dataplane"];
        assert_eq!(dp["automountServiceAccountToken"], false, "{what}: the dataplane needs no API token");
        if extra.iter().any(|a| a.starts_with("plugins.volumes[2].image")) {
            // Kept by the API server (a server without the ImageVolume feature drops the
            // field), and mounted where Plugin resources point.
            let vols = dp["volumes"].as_array().unwrap_or_else(|| panic!("{what}: no volumes"));
            let go = vols.iter().find(|v| v["name"] == "plugin-go").unwrap_or_else(|| panic!("{what}: {vols:?}"));
            assert_eq!(
                go["image"],
                json!({"reference": "registry.example.com/team/go-plugins:v3", "pullPolicy": "IfNotPresent"}),
                "{what}"
            );
            let mounts =
                dp["containers"][0]["volumeMounts"].as_array().unwrap_or_else(|| panic!("{what}: no volume mounts"));
            assert!(
                mounts.iter().any(|m| m["name"] == "plugin-go" && m["mountPath"] == "/opt/gatehouse/plugins/go"),
                "{what}: {mounts:?}"
            );
        }
        let token = dp["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_object().cloned())
            .unwrap_or_else(|| panic!("{what}: no projected token"));
        assert_eq!(token["audience"], "gatehouse", "{what}");
        let ctl_args = pods["gatehouse-controller"]["containers"][0]["args"].to_string();
        assert!(ctl_args.contains("--token-audience=gatehouse"), "{what}: {ctl_args}");
        assert!(
            ctl_args.contains(&format!("--allowed-service-account={ns}:gatehouse-dataplane")),
            "{what}: {ctl_args}"
        );
        // The config stream is TLS; dataplanes get the CA and nothing else of its Secret.
        let ca = dp["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "controller-ca");
        let ca = ca.unwrap_or_else(|| panic!("{what}: no controller-ca volume"));
        assert_eq!(ca["secret"]["secretName"], "gatehouse-controller-tls", "{what}: {ca}");
        assert_eq!(ca["secret"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]), "{what}: {ca}");
        let dp_args = dp["containers"][0]["args"].to_string();
        assert!(
            dp_args.contains(&format!("--controller=https://gatehouse-controller.{ns}.svc:9443")),
            "{what}: {dp_args}"
        );
        assert!(ctl_args.contains("--tls-cert-file=/etc/gatehouse/tls/tls.crt"), "{what}: {ctl_args}");
        let svc = objects.iter().find(|o| o["kind"] == "Service" && o["metadata"]["name"] == "gatehouse-dataplane");
        let ports = svc.map(|s| s["spec"]["ports"].clone()).unwrap_or_default();
        let https = ports.as_array().into_iter().flatten().find(|p| p["name"] == "https");
        assert_eq!(https.map(|p| &p["port"]), Some(&json!(443)), "{what}: the dataplane Service: {ports}");
        assert!(dp_args.contains("--tls-listen=0.0.0.0:8443"), "{what}: {dp_args}");
        let tls = objects.iter().find(|o| o["kind"] == "Secret" && o["metadata"]["name"] == "gatehouse-controller-tls");
        let tls = tls.unwrap_or_else(|| panic!("{what}: no generated gatehouse-controller-tls Secret"));
        assert_eq!(tls["type"], "kubernetes.io/tls", "{what}");
        for k in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(tls["data"][k].as_str().is_some_and(|v| !v.is_empty()), "{what}: the TLS Secret has no {k}");
        }
        let mounts = dp["containers"][0]["volumeMounts"].to_string();
        if extra.contains(&"plugins.volumes[0].subPath=v3") {
            assert!(mounts.contains(r#""mountPath":"/opt/gatehouse/plugins/shared","name":"plugin-shared","readOnly":true,"subPath":"v3""#), "{mounts}");
            assert!(
                mounts
                    .contains(r#""mountPath":"/opt/gatehouse/plugins/signed","name":"plugin-signed","readOnly":true"#),
                "{mounts}"
            );
        }
        if extra.contains(&"counters.redis.caConfigMap=redis-ca") {
            let args = dp["containers"][0]["args"].to_string();
            assert!(args.contains("--counters-ca-file=/etc/gatehouse/redis-ca/ca.crt"), "{what}: {args}");
            assert!(
                mounts.contains(r#""mountPath":"/etc/gatehouse/redis-ca","name":"redis-ca","readOnly":true"#),
                "{mounts}"
            );
            let ca = dp["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == "redis-ca");
            let ca = ca.unwrap_or_else(|| panic!("{what}: no redis-ca volume"));
            assert_eq!(ca["configMap"]["name"], "redis-ca", "{what}: {ca}");
            assert_eq!(ca["configMap"]["items"], json!([{"key": "ca.crt", "path": "ca.crt"}]), "{what}: {ca}");
        }
        if extra.contains(&EXAMPLE_VALUES) {
            for p in ["foo-bar-header", "c-add-header", "response-rewrite"] {
                assert!(
                    mounts
                        .contains(&format!(r#""mountPath":"{PLUGIN_MOUNT}/{p}","name":"plugin-{p}","readOnly":true"#)),
                    "{mounts}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_user_journey_install_configure_upgrade_uninstall() {
    let started = Instant::now();
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, "chart").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mount = dir.path().join("plugins");
    let mount_str = mount.display().to_string();
    let step = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());

    // Plugins small enough for ConfigMaps, shipped as docs/kubernetes.md shows.
    step("building the example plugins");
    let built = build_plugins(&dir.path().join("build"));
    for (name, file) in &built {
        let from = format!("--from-file={}", file.display());
        must(kubectl(&c, &["-n", &ns, "create", "configmap", name, &from], None));
    }

    // helm install, with the examples' values; only the plugin mount path and the watched
    // namespace are the test's own.
    step("helm install");
    let watch = format!("controller.watchNamespace={ns}");
    let mount_set = format!("plugins.mountPath={mount_str}");
    let install = ["--namespace", &ns, "-f", EXAMPLE_VALUES, "--set", &watch, "--set", &mount_set];
    let notes = must(helm(&c, &[&["install", "gatehouse", CHART][..], &install[..]].concat()));
    assert!(notes.contains("STATUS: deployed"), "{notes}");
    assert!(
        notes.contains("kubectl -n") && notes.contains("port-forward service/gatehouse-dataplane"),
        "NOTES:\n{notes}"
    );

    // What the chart created, read back from the API server.
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), &ns);
    let ctl_dep = deployments.get("gatehouse-controller").await.unwrap_or_else(|e| panic!("{e}"));
    let dp_dep = deployments.get("gatehouse-dataplane").await.unwrap_or_else(|e| panic!("{e}"));
    let replicas = |d: &Deployment| usize::try_from(d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)).unwrap_or(1);
    assert_eq!((replicas(&ctl_dep), replicas(&dp_dep)), (2, 2), "the chart's default replicas");
    let svc: Api<Service> = Api::namespaced(c.client.clone(), &ns);
    let ctl_svc = svc.get(&controller_service(&dp_dep)).await.unwrap_or_else(|e| panic!("the controller Service: {e}"));
    let selector = ctl_svc.spec.as_ref().and_then(|s| s.selector.clone()).unwrap_or_default();
    let pod_labels = ctl_dep
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "the Service selects the controller pods"
    );

    // The controller authenticates as its own ServiceAccount: the chart's RBAC is all it has.
    let ctl_sa =
        ctl_dep.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|s| s.service_account_name.clone());
    let ctl_sa = ctl_sa.unwrap_or_else(|| panic!("the controller names no ServiceAccount"));
    let sa_token = must(kubectl(&c, &["-n", &ns, "create", "token", &ctl_sa, "--duration", "2h"], None));
    let sa_kubeconfig = dir.path().join("controller.kubeconfig");
    std::fs::copy(&c.kubeconfig, &sa_kubeconfig).unwrap_or_else(|e| panic!("{e}"));
    let kc = |args: &[&str]| {
        must(run(Command::new(&c.kubectl).arg("--kubeconfig").arg(&sa_kubeconfig).args(args), None));
    };
    kc(&["config", "set-credentials", "controller-sa", &format!("--token={}", sa_token.trim())]);
    kc(&["config", "set-context", "--current", "--user=controller-sa"]);

    step("mounting the plugin ConfigMaps, starting 2 controllers and 2 dataplanes");
    assert_eq!(mount_configmaps(&c.client, &ns, &dp_dep, &mount).await, 3, "three plugin volumes");
    let pods = dir.path().join("pods");
    let controllers: Vec<Proc> =
        (0..replicas(&ctl_dep)).map(|i| start_controller(&c, &ctl_dep, i, &ns, &pods, &sa_kubeconfig)).collect();
    // Each dataplane on another controller replica, as the Service would spread them: acks
    // reach the leader through the follower.
    let dataplanes: Vec<Proc> = (0..replicas(&dp_dep))
        .map(|i| start_dataplane(&c, &dp_dep, i, &ns, &pods, &controllers[i % controllers.len()]))
        .collect();

    // The examples, as a user applies them, and the slice the EndpointSlice controller would
    // write for the httpbin Service.
    step("kubectl apply -f examples/kubernetes/");
    let upstream = echo_upstream(host_ip()).await;
    let plugins_yaml = example("plugins.yaml").replace(&format!("{PLUGIN_MOUNT}/"), &format!("{mount_str}/"));
    let apis_yaml = example("apis.yaml");
    for yaml in [example("httpbin.yaml"), plugins_yaml.clone(), apis_yaml.clone(), example("keys.yaml")] {
        must(kubectl(&c, &["-n", &ns, "apply", "-f", "-"], Some(yaml.as_bytes())));
    }
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: httpbin-local, labels: {{kubernetes.io/service-name: httpbin}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [\"{}\"], conditions: {{ready: true}}}}]\n",
        upstream.port(),
        upstream.ip()
    );
    must(kubectl(&c, &["-n", &ns, "apply", "-f", "-"], Some(slice.as_bytes())));

    step("waiting for status");
    for api in ["httpbin", "rewrite"] {
        wait_condition::<ApiDefinition>(&c.client, &ns, api, "Programmed", "2/2 dataplanes serve generation 1", 1)
            .await;
    }
    for plugin in ["foo-bar-header", "c-add-header", "response-rewrite"] {
        wait_condition::<Plugin>(&c.client, &ns, plugin, "Loaded", "2/2 dataplanes loaded generation 1", 1).await;
    }

    step("requests through both dataplanes");
    for dp in &dataplanes {
        let saw = upstream_saw(dp).await.unwrap_or_else(|e| panic!("{}: {e}", dp.addr));
        assert_eq!(saw.get("foo"), Some(&vec!["Bar".to_owned()]), "pre: the Rust plugin's header: {saw:?}");
        assert_eq!(
            saw.get("x-c-plugin"),
            Some(&vec!["hello from a ConfigMap".to_owned()]),
            "post: the C plugin: {saw:?}"
        );
        assert_eq!(saw.get("x-c-plugin-version"), Some(&vec!["c-example".to_owned()]), "{saw:?}");
        for key in [None, Some("not-a-key")] {
            let headers: Vec<(&str, &str)> = key.map(|k| ("authorization", k)).into_iter().collect();
            let (status, _, body) = fetch(dp, "/httpbin/headers", &headers).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(status, StatusCode::UNAUTHORIZED, "key {key:?}: {body}");
        }
        let (status, headers, body) = fetch(dp, "/rewrite/get", &[]).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::OK, r#"{"message":"Hi! I'm a response plugin"}"#),
            "response plugin"
        );
        assert_eq!(headers.get("x-response-added").and_then(|v| v.to_str().ok()), Some("resp-added"));
    }

    // A certificate Secret an ApiDefinition names travels the chart's TLS config stream and
    // is served on every dataplane's TLS port.
    step("HTTPS with a certificate Secret");
    let site = crate::stream_tls::Ca::new("chart site CA");
    let leaf = site.leaf(&["secure.example"]);
    let secure = format!(
        "{}---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: secure}}\nspec:\n  listenPath: /secure/\n  hosts: [secure.example]\n  tls: {{secretName: secure-cert}}\n  upstream: {{service: {{name: httpbin, port: 80}}}}\n",
        crate::stream_tls::tls_secret("secure-cert", &leaf)
    );
    must(kubectl(&c, &["-n", &ns, "apply", "-f", "-"], Some(secure.as_bytes())));
    wait_condition::<ApiDefinition>(&c.client, &ns, "secure", "Programmed", "2/2 dataplanes serve generation 1", 1)
        .await;
    for dp in &dataplanes {
        let tls = dp.tls.unwrap_or_else(|| panic!("{}: no TLS listener", dp.addr));
        let (status, shown) = crate::stream_tls::https_get(tls, "secure.example", &site.pem, "/secure/get")
            .await
            .unwrap_or_else(|e| panic!("{tls}: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK", "{tls}");
        assert_eq!(shown, crate::stream_tls::der(&leaf.0), "{tls}: the Secret's certificate");
    }

    // A new version of a plugin: the ConfigMap is replaced (docs/kubernetes.md), the kubelet
    // swaps the files, the dataplanes reload it by content hash.
    step("upgrading the C plugin through its ConfigMap");
    let v2 = build_c_plugin(&dir.path().join("build-v2"), Some("v2"));
    let from = format!("--from-file={}", v2.display());
    let cm = must(kubectl(
        &c,
        &["-n", &ns, "create", "configmap", "c-add-header", &from, "--dry-run=client", "-o", "yaml"],
        None,
    ));
    must(kubectl(&c, &["-n", &ns, "replace", "-f", "-"], Some(cm.as_bytes())));
    mount_configmaps(&c.client, &ns, &dp_dep, &mount).await;
    for dp in &dataplanes {
        let took = eventually("the new plugin version served", || async {
            let saw = upstream_saw(dp).await?;
            if saw.get("x-c-plugin-version") == Some(&vec!["v2".to_owned()]) { Ok(()) } else { Err(format!("{saw:?}")) }
        })
        .await;
        eprintln!("ConfigMap update → served on {}: {took:?}", dp.addr);
    }

    // A changed hook config, and the Plugin pinned to the new file's sha256.
    step("changing the ApiDefinition and the Plugin");
    let apis_v2 = apis_yaml.replace("config: \"hello from a ConfigMap\"", "config: \"changed by kubectl apply\"");
    assert_ne!(apis_v2, apis_yaml, "examples/kubernetes/apis.yaml no longer has the config this test changes");
    let pin = format!("  path: {mount_str}/c-add-header/libc_add_header.so\n  sha256: \"{}\"", sha256_hex(&v2));
    let plugins_v2 = plugins_yaml.replace(&format!("  path: {mount_str}/c-add-header/libc_add_header.so"), &pin);
    assert_ne!(plugins_v2, plugins_yaml, "examples/kubernetes/plugins.yaml no longer has the path this test pins");
    for yaml in [&apis_v2, &plugins_v2] {
        must(kubectl(&c, &["-n", &ns, "apply", "-f", "-"], Some(yaml.as_bytes())));
    }
    for dp in &dataplanes {
        eventually("the new config served", || async {
            let saw = upstream_saw(dp).await?;
            let want = vec!["changed by kubectl apply".to_owned()];
            if saw.get("x-c-plugin") == Some(&want) { Ok(()) } else { Err(format!("{saw:?}")) }
        })
        .await;
    }
    wait_condition::<ApiDefinition>(&c.client, &ns, "httpbin", "Programmed", "2/2 dataplanes serve generation 2", 2)
        .await;
    wait_condition::<Plugin>(&c.client, &ns, "c-add-header", "Loaded", "2/2 dataplanes loaded generation 2", 2).await;
    wait_condition::<ApiDefinition>(&c.client, &ns, "rewrite", "Programmed", "2/2 dataplanes serve generation 1", 1)
        .await;

    // The chart's RBAC, as the API server sees it: what the controller needs, nothing more.
    step("kubectl auth can-i");
    let can = |sa: &str, args: &[&str]| {
        let who = format!("--as=system:serviceaccount:{ns}:{sa}");
        let mut all = vec!["auth", "can-i", &who];
        all.extend_from_slice(args);
        // `can-i` exits 1 for "no".
        match kubectl(&c, &all, None) {
            Ok(out) => out.trim() == "yes",
            Err(e) if e.contains("\nno") || e.ends_with("no\n") => false,
            Err(e) => panic!("{e}"),
        }
    };
    let dp_sa =
        dp_dep.spec.as_ref().and_then(|s| s.template.spec.as_ref()).and_then(|s| s.service_account_name.clone());
    let dp_sa = dp_sa.unwrap_or_default();
    let n = ns.as_str();
    for (args, allowed) in [
        (&["watch", "apidefinitions.gatehouse.dev", "-n", n][..], true),
        (&["patch", "plugins.gatehouse.dev", "--subresource=status", "-n", n], true),
        (&["list", "secrets", "-n", n], true),
        (&["create", "tokenreviews.authentication.k8s.io", "--all-namespaces"], true),
        (&["update", "leases.coordination.k8s.io/gatehouse-controller", "-n", n], true),
        (&["get", "secrets", "-n", n], false),
        (&["list", "secrets", "-n", "default"], false),
        (&["create", "apidefinitions.gatehouse.dev", "-n", n], false),
        (&["update", "apidefinitions.gatehouse.dev", "-n", n], false),
        (&["delete", "leases.coordination.k8s.io/gatehouse-controller", "-n", n], false),
        (&["update", "leases.coordination.k8s.io/another-lease", "-n", n], false),
        (&["list", "configmaps", "-n", n], false),
        (&["create", "pods", "-n", n], false),
    ] {
        assert_eq!(can(&ctl_sa, args), allowed, "controller: can-i {args:?}");
    }
    for args in [
        &["list", "apidefinitions.gatehouse.dev", "-n", n][..],
        &["get", "secrets", "-n", n],
        &["list", "pods", "-n", n],
    ] {
        assert!(!can(&dp_sa, args), "the dataplane has no RBAC: can-i {args:?}");
    }

    // helm upgrade with other values: the objects follow.
    step("helm upgrade");
    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), &ns);
    let key_id_secret = async || {
        let s = secrets.get("gatehouse-dataplane-key-id").await.unwrap_or_else(|e| panic!("key id Secret: {e}"));
        s.data.unwrap_or_default().get("secret").map(|b| b.0.clone()).unwrap_or_default()
    };
    let key_id_before = key_id_secret().await;
    assert!(key_id_before.len() >= 16, "the chart generates a key id secret");
    let upgrade = [
        &["upgrade", "gatehouse", CHART][..],
        &install[..],
        &["--set", "dataplane.replicas=3", "--set", "dataplane.service.type=NodePort"],
    ]
    .concat();
    must(helm(&c, &upgrade));
    let dp_dep = deployments.get("gatehouse-dataplane").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(replicas(&dp_dep), 3);
    let dp_svc = svc.get("gatehouse-dataplane").await.unwrap_or_else(|e| panic!("{e}"));
    let spec = dp_svc.spec.unwrap_or_default();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert!(spec.ports.unwrap_or_default().iter().all(|p| p.node_port.is_some()), "a node port is allocated");
    assert_eq!(key_id_secret().await, key_id_before, "an upgrade keeps the key id secret");
    let ctl_after = deployments.get("gatehouse-controller").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ctl_after.metadata.generation, ctl_dep.metadata.generation, "the controller Deployment is unchanged");
    // The running gateways are not disturbed by an upgrade of other objects.
    for dp in &dataplanes {
        upstream_saw(dp).await.unwrap_or_else(|e| panic!("after the upgrade: {e}"));
    }

    step("helm uninstall");
    must(helm(&c, &["uninstall", "gatehouse", "--namespace", &ns]));
    drop(dataplanes);
    drop(controllers);
    assert_nothing_left(&c.client, &ns).await;
    step("done");
}

/// Nothing the chart created is left: every kind it makes, by the release's label (and the
/// cluster-scoped ones by this namespace's prefix); helm's release records are gone too.
async fn assert_nothing_left(client: &Client, ns: &str) {
    let by_release = ListParams::default().labels("app.kubernetes.io/instance=gatehouse");
    async fn names<K>(api: Api<K>, lp: &ListParams) -> Vec<String>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let list = api.list(lp).await.unwrap_or_else(|e| panic!("listing: {e}"));
        list.items
            .iter()
            .map(|o| format!("{}/{}", K::kind(&Default::default()), o.meta().name.clone().unwrap_or_default()))
            .collect()
    }
    let c = client.clone();
    let mut left = Vec::new();
    left.extend(names(Api::<Deployment>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<Service>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<ServiceAccount>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<Role>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<RoleBinding>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<PodDisruptionBudget>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<ConfigMap>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<Secret>::namespaced(c.clone(), ns), &by_release).await);
    left.extend(names(Api::<Secret>::namespaced(c.clone(), ns), &ListParams::default().labels("owner=helm")).await);
    let prefix = format!("ClusterRole/{ns}-");
    let binding_prefix = format!("ClusterRoleBinding/{ns}-");
    left.extend(
        names(Api::<ClusterRole>::all(c.clone()), &by_release).await.into_iter().filter(|n| n.starts_with(&prefix)),
    );
    left.extend(
        names(Api::<ClusterRoleBinding>::all(c.clone()), &by_release)
            .await
            .into_iter()
            .filter(|n| n.starts_with(&binding_prefix)),
    );
    assert!(left.is_empty(), "left after helm uninstall: {left:?}");
    // What the user made stays: their ConfigMaps, resources and the CRDs (helm never deletes crds/).
    let cms = Api::<ConfigMap>::namespaced(c.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cms.items.iter().any(|cm| cm.metadata.name.as_deref() == Some("foo-bar-header")));
}
