//! Kubernetes mode: config from the controller's stream.
//!
//! The dataplane keeps its last applied snapshot on disk and serves it at start while the
//! controller is unreachable: a controller outage means no new config, never an outage.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use gatehouse_crds::{
    protocol::{ACK_PATH, Ack, HEARTBEAT, ResourceResult, STREAM_PATH, StreamMessage},
    snapshot::Snapshot,
};
use http::{Request, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

use crate::{cli::Cli, gateway::Gateway, runtime::Changed};

/// The controller pings every 10 s; this much silence means the connection is dead.
const SILENCE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Heartbeats between full acks: a newly elected leader learns everything within this.
const FULL_ACK_EVERY: u32 = 2;
/// Stream bytes taken into one build at most.
const BURST_BYTES: usize = 16 << 20;

/// What an ack reports.
enum Acked {
    All,
    Changed { apis: BTreeSet<String>, plugins: BTreeSet<String> },
    Nothing,
}

/// Applies one message to the snapshot; what to acknowledge once it is served, and what
/// it changed. `secured`: the stream runs over TLS, the only way certificates may come.
fn on_message(
    current: &mut Option<Arc<Snapshot>>,
    msg: StreamMessage,
    secured: bool,
) -> anyhow::Result<Option<(Acked, Changed)>> {
    match msg {
        StreamMessage::Ping => Ok(None),
        StreamMessage::Snapshot { mut snapshot } => {
            if !secured {
                refuse_certificates(&mut snapshot.certificates);
                refuse_certificates(&mut snapshot.ca_certificates);
            }
            *current = Some(Arc::new(snapshot));
            Ok(Some((Acked::All, Changed::All)))
        }
        StreamMessage::Delta(mut d) => {
            if !secured {
                refuse_certificates(&mut d.certificates);
                refuse_certificates(&mut d.ca_certificates);
            }
            let Some(s) = current.as_mut() else { bail!("a delta before any snapshot") };
            let since = s.version;
            // Out of order means a lost message: reconnect for the whole state. The config
            // thread and the last save have let go of it, so this changes it in place.
            Arc::make_mut(s).apply(&d)?;
            let only_apis =
                d.plugins.is_empty() && d.keys.is_empty() && d.certificates.is_empty() && d.ca_certificates.is_empty();
            let apis: BTreeSet<String> = d.apis.into_keys().collect();
            let changed = if only_apis { Changed::Apis { since, ids: apis.clone() } } else { Changed::All };
            Ok(Some((Acked::Changed { apis, plugins: d.plugins.into_keys().collect() }, changed)))
        }
    }
}

/// The stream is plaintext: a private key that came over it is exposed already, and
/// serving it would hide that. Certificates are dropped, never applied nor saved to disk.
fn refuse_certificates<T>(certificates: &mut std::collections::BTreeMap<String, T>) {
    if !certificates.is_empty() {
        tracing::error!(
            certificates = ?certificates.keys().collect::<Vec<_>>(),
            "certificates arrived over the plaintext config stream; ignoring them"
        );
        certificates.clear();
    }
}

impl Acked {
    fn merge(self, other: Acked) -> Acked {
        match (self, other) {
            (Acked::All, _) | (_, Acked::All) => Acked::All,
            (Acked::Changed { mut apis, mut plugins }, Acked::Changed { apis: a, plugins: p }) => {
                apis.extend(a);
                plugins.extend(p);
                Acked::Changed { apis, plugins }
            }
            (Acked::Nothing, x) | (x, Acked::Nothing) => x,
        }
    }

    fn apis(&self) -> Option<&BTreeSet<String>> {
        match self {
            Acked::Changed { apis, .. } => Some(apis),
            _ => None,
        }
    }
    fn plugins(&self) -> Option<&BTreeSet<String>> {
        match self {
            Acked::Changed { plugins, .. } => Some(plugins),
            _ => None,
        }
    }
}

type StreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

pub struct Subscriber {
    base: String,
    /// `https://`: the controller is verified, and certificates are taken from it.
    secured: bool,
    ca_file: Option<PathBuf>,
    server_name: Option<ServerName<'static>>,
    token_file: PathBuf,
    state_file: PathBuf,
    node: String,
}

impl Subscriber {
    pub fn new(url: &str, cli: &Cli) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().with_context(|| format!("--controller {url}"))?;
        let secured = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!("--controller {url}: expected https://host:port (or http://)"),
        };
        if uri.authority().is_none() {
            bail!("--controller {url}: expected https://host:port (or http://)");
        }
        if !secured && (cli.controller_ca_file.is_some() || cli.controller_server_name.is_some()) {
            bail!("--controller {url}: --controller-ca-file and --controller-server-name need an https:// controller");
        }
        if !secured {
            tracing::warn!(controller = %url, "the config stream is plaintext: certificates from it are refused");
        }
        let server_name = cli
            .controller_server_name
            .as_deref()
            .map(|n| ServerName::try_from(n.to_owned()).with_context(|| format!("--controller-server-name {n}")))
            .transpose()?;
        std::fs::create_dir_all(&cli.state_dir).with_context(|| format!("--state-dir {}", cli.state_dir.display()))?;
        let node = cli.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| format!("dataplane-{}", std::process::id()))
        });
        let me = Self {
            base,
            secured,
            ca_file: cli.controller_ca_file.clone(),
            server_name,
            token_file: cli.token_file.clone(),
            state_file: cli.state_dir.join("snapshot.json"),
            node,
        };
        me.client()?;
        Ok(me)
    }

    /// A client for one session: the CA file is read again each time, so a rotated CA is
    /// picked up on the next connection.
    fn client(&self) -> anyhow::Result<StreamClient> {
        let roots = match (&self.ca_file, self.secured) {
            (_, false) => RootCertStore::empty(),
            (Some(path), true) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("--controller-ca-file {}: not PEM certificates", path.display()))?;
                let mut roots = RootCertStore::empty();
                if roots.add_parsable_certificates(certs).0 == 0 {
                    bail!("--controller-ca-file {}: no CA certificate", path.display());
                }
                roots
            }
            (None, true) => {
                let roots = crate::connect::system_roots().map_err(|_| {
                    anyhow::anyhow!(
                        "no system CA certificates to verify the controller against; give --controller-ca-file"
                    )
                })?;
                RootCertStore::clone(&roots)
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_or_http();
        let builder = match &self.server_name {
            Some(n) => builder.with_server_name_resolver(FixedServerNameResolver::new(n.clone())),
            None => builder,
        };
        Ok(Client::builder(TokioExecutor::new()).build(builder.enable_http1().build()))
    }

    pub async fn run(self, gw: Arc<Gateway>) {
        match self.load() {
            Ok(Some(s)) => {
                tracing::info!(
                    version = s.version,
                    apis = s.apis.len(),
                    "serving the config saved on disk until the controller answers"
                );
                if let Err(e) = gw.apply(Arc::new(s)).await {
                    tracing::error!(error = %e, "saved config not applied");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), file = %self.state_file.display(), "saved config unreadable; ignoring it")
            }
        }
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = Instant::now();
            if let Err(e) = self.session(&gw).await {
                tracing::warn!(error = %format!("{e:#}"), controller = %self.base, "config stream lost; serving the last applied config");
            }
            if started.elapsed() > BACKOFF_MAX * 3 {
                backoff = BACKOFF_MIN;
            }
            // Jitter from the clock, so a fleet of dataplanes does not reconnect in step.
            let jitter =
                Duration::from_millis(u64::from(jiff::Timestamp::now().subsec_nanosecond().unsigned_abs() % 200));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn load(&self) -> anyhow::Result<Option<Snapshot>> {
        match std::fs::read(&self.state_file) {
            Ok(bytes) => {
                let mut s: Snapshot = serde_json::from_slice(&bytes)?;
                if !self.secured {
                    // Saved from a TLS stream, now read for a plaintext one: not applied.
                    refuse_certificates(&mut s.certificates);
                    refuse_certificates(&mut s.ca_certificates);
                }
                Ok(Some(s))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Saves `s` on a blocking thread: writing a large config takes milliseconds that a
    /// request worker must not spend. One save at a time, so that an older one never
    /// replaces a newer.
    async fn save(&self, s: Arc<Snapshot>, saving: &mut Option<tokio::task::JoinHandle<()>>) {
        if let Some(prev) = saving.take() {
            let _ = prev.await;
        }
        let file = self.state_file.clone();
        *saving = Some(tokio::task::spawn_blocking(move || save(&file, &s)));
    }

    fn token(&self) -> anyhow::Result<String> {
        let t = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("--token-file {}", self.token_file.display()))?;
        Ok(t.trim().to_owned())
    }

    async fn session(&self, gw: &Gateway) -> anyhow::Result<()> {
        let token = self.token()?;
        let client = self.client()?;
        let req = Request::get(format!("{}{STREAM_PATH}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        let resp = client.request(req).await.context("connecting to the controller")?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            bail!("controller refused the stream: {status} {}", String::from_utf8_lossy(&body));
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        let mut current: Option<Arc<Snapshot>> = None;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        // Saving is O(config size): at most once per SAVE_EVERY, not once per delta.
        let mut save = tokio::time::interval(SAVE_EVERY);
        let mut dirty = false;
        let mut saving = None;
        let mut beats = 0u32;
        let result = loop {
            tokio::select! {
                frame = tokio::time::timeout(SILENCE, body.frame()) => {
                    let frame = match frame {
                        Err(_) => break Err(anyhow::anyhow!("no word from the controller for {SILENCE:?}")),
                        Ok(None) => break Err(anyhow::anyhow!("the controller closed the stream")),
                        Ok(Some(Err(e))) => break Err(anyhow::Error::from(e).context("reading the stream")),
                        Ok(Some(Ok(f))) => f,
                    };
                    let Some(data) = frame.data_ref() else { continue };
                    buf.extend_from_slice(data);
                    // What else has arrived goes into the same build: at 10,000 APIs a build
                    // takes milliseconds, and deltas can come faster than that.
                    let ended = take_ready(&mut body, &mut buf).await;
                    // A save still writing holds the snapshot: changed now, it would be copied
                    // whole. Waiting for the save parks no worker.
                    if let Some(s) = saving.take() {
                        let _ = s.await;
                    }
                    if let Err(e) = self.on_lines(gw, &client, &mut buf, &mut current, &mut dirty, &token).await {
                        break Err(e);
                    }
                    if let Some(e) = ended {
                        break Err(e);
                    }
                }
                _ = save.tick() => {
                    let busy = saving.as_ref().is_some_and(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
                    if let (true, false, Some(s)) = (dirty, busy, &current) {
                        self.save(s.clone(), &mut saving).await;
                        dirty = false;
                    }
                }
                _ = heartbeat.tick() => {
                    if let Some(s) = &current {
                        // In Kubernetes, plugin files change under mounted volumes.
                        beats += 1;
                        let acked = if gw.plugins_changed().await.unwrap_or(false) {
                            tracing::info!("a plugin file changed; reloading it");
                            if let Err(e) = gw.apply(s.clone()).await {
                                tracing::error!(error = %e, "config not applied");
                            }
                            Acked::All
                        } else if beats.is_multiple_of(FULL_ACK_EVERY) {
                            // Now and then the whole state: for a newly elected leader, and in
                            // case a result changed outside a delta (a route clash resolved).
                            Acked::All
                        } else {
                            Acked::Nothing
                        };
                        self.ack(gw, &client, current.as_deref(), &token, &acked).await;
                    }
                }
            }
        };
        if let (true, Some(s)) = (dirty, &current) {
            self.save(s.clone(), &mut saving).await;
        }
        if let Some(last) = saving {
            let _ = last.await;
        }
        result
    }

    /// Applies every complete message in `buf`, then builds the runtime once and acks once:
    /// a burst of deltas costs one rebuild, not one per delta.
    async fn on_lines(
        &self,
        gw: &Gateway,
        client: &StreamClient,
        buf: &mut BytesMut,
        current: &mut Option<Arc<Snapshot>>,
        dirty: &mut bool,
        token: &str,
    ) -> anyhow::Result<()> {
        let mut acked: Option<(Acked, Changed)> = None;
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(end + 1);
            let msg: StreamMessage = serde_json::from_slice(&line).context("a stream message")?;
            if let Some((a, c)) = on_message(current, msg, self.secured)? {
                acked = Some(match acked.take() {
                    None => (a, c),
                    Some((prev_a, prev_c)) => (prev_a.merge(a), prev_c.merge(c)),
                });
            }
        }
        let (Some((acked, changed)), Some(snapshot)) = (acked, current.as_ref()) else { return Ok(()) };
        gw.apply_changed(snapshot.clone(), changed).await.context("building the runtime")?;
        tracing::debug!(version = snapshot.version, apis = snapshot.apis.len(), "config applied");
        *dirty = true;
        self.ack(gw, client, Some(snapshot), token, &acked).await;
        Ok(())
    }

    /// Acknowledges what `acked` names: everything after a snapshot, the changed resources
    /// after a delta, nothing but liveness in a heartbeat. Acks stay as small as the change.
    async fn ack(&self, gw: &Gateway, client: &StreamClient, current: Option<&Snapshot>, token: &str, acked: &Acked) {
        let Some(snapshot) = current else { return };
        let rt = gw.runtime();
        let wanted = |id: &String, changed: fn(&Acked) -> Option<&BTreeSet<String>>| match acked {
            Acked::All => true,
            Acked::Nothing => false,
            Acked::Changed { .. } => changed(acked).is_some_and(|c| c.contains(id)),
        };
        // A changed API is looked up, not searched for: an ack costs the change's size.
        let all = matches!(acked, Acked::All).then(|| rt.report.apis.iter()).into_iter().flatten();
        let changed = acked.apis().into_iter().flatten().filter_map(|id| rt.report.apis.get(id));
        let apis = all
            .chain(changed)
            .map(|a| {
                let message = if a.ok() { String::new() } else { a.state.clone() };
                (a.id.clone(), ResourceResult { generation: a.generation, ok: a.ok(), message })
            })
            .collect();
        let plugins = rt
            .report
            .plugins
            .iter()
            .filter(|p| wanted(&p.id, Acked::plugins))
            .map(|p| {
                let generation = snapshot.plugins.get(&p.id).map_or(0, |e| e.generation);
                (p.id.clone(), plugin_result(p, generation))
            })
            .collect();
        let partial = !matches!(acked, Acked::All);
        let ack = Ack { node: self.node.clone(), version: rt.version, partial, apis, plugins };
        let Ok(body) = serde_json::to_vec(&ack) else { return };
        let req = Request::post(format!("{}{ACK_PATH}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        match client.request(req).await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "the controller refused an ack"),
            Err(e) => tracing::debug!(error = %e, "sending an ack"),
        }
    }
}

/// Moves the stream's frames that have already arrived into `buf` (up to `BURST_BYTES`),
/// without waiting for more; the stream's end, if it came.
async fn take_ready(body: &mut Incoming, buf: &mut BytesMut) -> Option<anyhow::Error> {
    while buf.len() < BURST_BYTES {
        let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await;
        match polled {
            Poll::Pending => return None,
            Poll::Ready(None) => return Some(anyhow::anyhow!("the controller closed the stream")),
            Poll::Ready(Some(Err(e))) => return Some(anyhow::Error::from(e).context("reading the stream")),
            Poll::Ready(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    buf.extend_from_slice(data);
                }
            }
        }
    }
    None
}

/// The file may hold private keys (certificates from a TLS stream): only this user may
/// read it.
fn save(file: &Path, s: &Snapshot) {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = file.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let result = serde_json::to_vec(s)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(&bytes)
        })
        .and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = result {
        tracing::warn!(error = %e, file = %file.display(), "cannot save the config to disk");
    }
}

/// A Plugin's ack: ok only when the file's current content is what is served. A Plugin
/// still served by its previous version because the new content was refused is not ok, and
/// the message (`serving <sha>; new content <sha> refused: <reason>`) says both.
fn plugin_result(p: &gatehouse_plugin_host::PluginReport, generation: i64) -> ResourceResult {
    let ok = p.state == "loaded";
    ResourceResult { generation, ok, message: if ok { String::new() } else { p.state.clone() } }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_plugin_host::PluginReport;

    #[test]
    fn a_plugin_serving_its_previous_version_is_acked_as_not_loaded_with_both_versions() {
        let state = "serving aaaa; new content bbbb refused: init failed: no license".to_owned();
        let report = PluginReport {
            id: "default/p".into(),
            path: "/plugins/libp.so".into(),
            sha256: Some("aaaa".into()),
            state: state.clone(),
            sdk: None,
        };
        assert_eq!(plugin_result(&report, 4), ResourceResult { generation: 4, ok: false, message: state });
        let loaded = PluginReport { state: "loaded".into(), ..report };
        assert_eq!(plugin_result(&loaded, 4), ResourceResult { generation: 4, ok: true, message: String::new() });
    }

    #[test]
    fn certificates_from_the_plaintext_stream_are_never_applied_and_from_a_secured_one_are() {
        let cert = gatehouse_crds::TlsSecret {
            namespace: "ns".into(),
            name: "c".into(),
            default: true,
            certificate_pem: "CERT".into(),
            private_key_pem: gatehouse_crds::PrivateKeyPem::new("KEY".into()),
            ca_certificate_pem: None,
        };
        let ca =
            gatehouse_crds::CaSecret { namespace: "ns".into(), name: "ca".into(), ca_certificate_pem: "CA".into() };
        for secured in [false, true] {
            let mut snapshot = Snapshot { version: 1, ..Default::default() };
            snapshot.certificates.insert("ns/c".into(), cert.clone());
            let mut current = None;
            on_message(&mut current, StreamMessage::Snapshot { snapshot }, secured).expect("applies");
            assert_eq!(current.as_ref().expect("applied").certificates.len(), usize::from(secured));
            let mut d = gatehouse_crds::protocol::Delta { version: 2, base: 1, ..Default::default() };
            d.certificates.insert("ns/c2".into(), Some(cert.clone()));
            d.ca_certificates.insert("ns/ca".into(), Some(ca.clone()));
            on_message(&mut current, StreamMessage::Delta(d), secured).expect("applies");
            let s = current.expect("applied");
            assert_eq!(s.version, 2);
            assert_eq!(s.certificates.len(), 2 * usize::from(secured), "secured: {secured}");
            assert_eq!(s.ca_certificates.len(), usize::from(secured), "secured: {secured}");
        }
    }
}
