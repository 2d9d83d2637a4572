//! The real Kubernetes API server (kube-apiserver + etcd, see `e2e/cluster/`) the tests run
//! against: one per test process, shared by every test in it.
//!
//! The first call to [`cluster`] runs `bash e2e/cluster.sh build` (a cold build takes ~5 min,
//! then it is cached) and `bash e2e/cluster.sh start DIR` into a fresh temporary directory.
//! If that fails (no `go`, a failed build, a server that does not come up) every test that
//! asks for the cluster fails with the script's own error: nothing passes silently.
//!
//! Stopping: Rust never drops statics, so the cluster is stopped by a watchdog, a small
//! detached shell (own session, so a Ctrl-C on the test run does not kill it) started before
//! the cluster. It waits for this test process to exit, however it ends (success, panic,
//! abort, SIGKILL), then runs `e2e/cluster.sh stop DIR` and removes DIR.
//!
//! Each test gets its own [`Client`] (a `kube::Client` is bound to the tokio runtime that
//! created it, and every `#[tokio::test]` has its own runtime) and isolates its objects in a
//! namespace from [`fresh_namespace`].
//!
//! Environment:
//! - `GATEHOUSE_E2E_KUBECONFIG=PATH`: use that running cluster instead of starting one
//!   (it is not stopped; `cluster.sh build` still runs, for helm and kubectl)
//! - `GATEHOUSE_E2E_KEEP=1`: stop the cluster but keep DIR (`kube-apiserver.log`, ...)
//! - those of `e2e/cluster.sh`: `GATEHOUSE_CACHE`, `GATEHOUSE_CLUSTER_START_TIMEOUT`

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions::is_crd_established},
};

/// The field manager the tests use for server-side apply.
pub const MANAGER: &str = "gatehouse-e2e";

/// The shared cluster, as a test sees it.
pub struct Cluster {
    /// A client of this test's own (see the module docs).
    pub client: Client,
    /// The admin kubeconfig, for processes the tests start (`KUBECONFIG=...`).
    pub kubeconfig: PathBuf,
    /// `kubectl` (from PATH, or built by `cluster.sh build`).
    pub kubectl: PathBuf,
    /// `helm`, as built by `cluster.sh build`.
    #[allow(dead_code, reason = "for the chart tests")]
    pub helm: PathBuf,
}

struct Shared {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR"));
    e2e.parent().unwrap_or(e2e).to_path_buf()
}

/// The shared cluster, started on first use; panics, with the reason, if it cannot start.
pub async fn cluster() -> Cluster {
    let shared = tokio::task::spawn_blocking(|| SHARED.get_or_init(start).as_ref())
        .await
        .unwrap_or_else(|e| panic!("starting the test cluster panicked: {e}"));
    let shared = match shared {
        Ok(s) => s,
        Err(e) => panic!("the e2e test cluster is not available:\n{e}"),
    };
    let kubeconfig = Kubeconfig::read_from(&shared.kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", shared.kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", shared.kubeconfig.display()));
    let client = Client::try_from(config).unwrap_or_else(|e| panic!("building a client: {e}"));
    Cluster {
        client,
        kubeconfig: shared.kubeconfig.clone(),
        kubectl: shared.kubectl.clone(),
        helm: shared.helm.clone(),
    }
}

fn start() -> Result<Shared, String> {
    let script = repo_root().join("e2e/cluster.sh");
    eprintln!("e2e: preparing the test cluster with {} (a cold build takes ~5 min)", script.display());
    let built = run(Command::new("bash").arg(&script).arg("build"))?;
    let tool = |key: &str| {
        built
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(PathBuf::from)
            .ok_or_else(|| format!("`cluster.sh build` printed no {key}= line; it printed:\n{built}"))
    };
    let (kubectl, helm) = (tool("KUBECTL")?, tool("HELM")?);

    if let Some(kubeconfig) = std::env::var_os("GATEHOUSE_E2E_KUBECONFIG") {
        eprintln!("e2e: using the running cluster of GATEHOUSE_E2E_KUBECONFIG={}", kubeconfig.display());
        return Ok(Shared { kubeconfig: kubeconfig.into(), kubectl, helm });
    }

    let dir = tempfile::Builder::new()
        .prefix("gatehouse-e2e-")
        .tempdir()
        .map_err(|e| format!("creating a temporary directory: {e}"))?
        .keep();
    spawn_watchdog(&script, &dir)?;
    let out = run(Command::new("bash").arg(&script).arg("start").arg(&dir))?;
    let kubeconfig = out.lines().last().map(PathBuf::from).filter(|p| p.is_file()).ok_or_else(|| {
        format!("`cluster.sh start {}` printed no kubeconfig path; it printed:\n{out}", dir.display())
    })?;
    eprintln!("e2e: test cluster running in {} (stopped when the tests exit)", dir.display());
    Ok(Shared { kubeconfig, kubectl, helm })
}

/// Runs a `cluster.sh` command; its stdout, or an error with the end of its stderr.
fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {shown}: {e} (is bash installed?)"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        return Err(format!("{shown} failed ({}):\n{tail}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the shell that stops the cluster in `dir` once this process has exited.
fn spawn_watchdog(script: &Path, dir: &Path) -> Result<(), String> {
    const WATCHDOG: &str = r#"
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        bash "$2" stop "$3" >/dev/null 2>&1
        [ "$4" = 1 ] || rm -rf "$3"
    "#;
    let keep = if std::env::var("GATEHOUSE_E2E_KEEP").is_ok_and(|v| v == "1") { "1" } else { "0" };
    Command::new("setsid")
        .args(["bash", "-c", WATCHDOG, "gatehouse-e2e-watchdog"])
        .arg(std::process::id().to_string())
        .arg(script)
        .arg(dir)
        .arg(keep)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("starting the cluster watchdog (setsid bash): {e}"))
}

/// Creates a namespace named `<prefix>-<random>` and returns its name.
///
/// There is no namespace controller in the test cluster (a deleted namespace would stay
/// Terminating), so namespaces are left behind: the cluster dies with the test process.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            labels: Some([("gatehouse.dev/e2e".to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let created = api
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating a namespace {prefix}-*: {e}"));
    created.metadata.name.unwrap_or_else(|| panic!("the API server named no namespace for {prefix}-*"))
}

/// Applies Gatehouse's CRDs (server-side apply, as generated by `gatehouse_crds::crdgen`, which
/// the chart's copies are checked against) and waits until the API server serves them.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in gatehouse_crds::crdgen::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("the API server refused CRD {name}: {e}"));
        match tokio::time::timeout(Duration::from_secs(30), await_condition(api.clone(), &name, is_crd_established()))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("watching CRD {name}: {e}"),
            Err(_) => panic!("CRD {name} was not Established after 30 s"),
        }
    }
}
