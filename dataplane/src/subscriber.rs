//! Kubernetes mode: config from the controller's stream.
//!
//! The dataplane keeps its last applied snapshot on disk and serves it at start while the
//! controller is unreachable: a controller outage means no new config, never an outage.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::Arc,
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
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

use crate::{cli::Cli, gateway::Gateway};

/// The controller pings every 10 s; this much silence means the connection is dead.
const SILENCE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Heartbeats between full acks: a newly elected leader learns everything within this.
const FULL_ACK_EVERY: u32 = 2;

/// What an ack reports.
enum Acked {
    All,
    Changed { apis: BTreeSet<String>, plugins: BTreeSet<String> },
    Nothing,
}

/// Applies one message to the snapshot; what to acknowledge once it is served.
fn on_message(current: &mut Option<Arc<Snapshot>>, msg: StreamMessage) -> anyhow::Result<Option<Acked>> {
    match msg {
        StreamMessage::Ping => Ok(None),
        StreamMessage::Snapshot { mut snapshot } => {
            refuse_certificates(&mut snapshot.certificates);
            refuse_certificates(&mut snapshot.ca_certificates);
            *current = Some(Arc::new(snapshot));
            Ok(Some(Acked::All))
        }
        StreamMessage::Delta(mut d) => {
            refuse_certificates(&mut d.certificates);
            let Some(s) = current.as_mut() else { bail!("a delta before any snapshot") };
            // Out of order means a lost message: reconnect for the whole state. The config
            // thread has let go of the last one applied, so this changes it in place.
            Arc::make_mut(s).apply(&d)?;
            Ok(Some(Acked::Changed { apis: d.apis.into_keys().collect(), plugins: d.plugins.into_keys().collect() }))
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

pub struct Subscriber {
    base: String,
    token_file: PathBuf,
    state_file: PathBuf,
    node: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Subscriber {
    pub fn new(url: &str, cli: &Cli) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let uri: http::Uri = base.parse().with_context(|| format!("--controller {url}"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            bail!("--controller {url}: expected http://host:port");
        }
        std::fs::create_dir_all(&cli.state_dir).with_context(|| format!("--state-dir {}", cli.state_dir.display()))?;
        let node = cli.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| format!("dataplane-{}", std::process::id()))
        });
        Ok(Self {
            base,
            token_file: cli.token_file.clone(),
            state_file: cli.state_dir.join("snapshot.json"),
            node,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
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
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn save(&self, s: &Snapshot) {
        let tmp = self.state_file.with_extension("json.tmp");
        let result = serde_json::to_vec(s)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.state_file));
        if let Err(e) = result {
            tracing::warn!(error = %e, file = %self.state_file.display(), "cannot save the config to disk");
        }
    }

    fn token(&self) -> anyhow::Result<String> {
        let t = std::fs::read_to_string(&self.token_file)
            .with_context(|| format!("--token-file {}", self.token_file.display()))?;
        Ok(t.trim().to_owned())
    }

    async fn session(&self, gw: &Gateway) -> anyhow::Result<()> {
        let token = self.token()?;
        let req = Request::get(format!("{}{STREAM_PATH}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))?;
        let resp = self.client.request(req).await.context("connecting to the controller")?;
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
                    if let Err(e) = self.on_lines(gw, &mut buf, &mut current, &mut dirty, &token).await {
                        break Err(e);
                    }
                }
                _ = save.tick() => {
                    if let (true, Some(s)) = (dirty, &current) {
                        self.save(s);
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
                        self.ack(gw, current.as_deref(), &token, &acked).await;
                    }
                }
            }
        };
        if let (true, Some(s)) = (dirty, &current) {
            self.save(s);
        }
        result
    }

    /// Applies every complete message in `buf`, then builds the runtime once and acks once:
    /// a burst of deltas costs one rebuild, not one per delta.
    async fn on_lines(
        &self,
        gw: &Gateway,
        buf: &mut BytesMut,
        current: &mut Option<Arc<Snapshot>>,
        dirty: &mut bool,
        token: &str,
    ) -> anyhow::Result<()> {
        let mut acked: Option<Acked> = None;
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(end + 1);
            let msg: StreamMessage = serde_json::from_slice(&line).context("a stream message")?;
            if let Some(a) = on_message(current, msg)? {
                acked = Some(match acked.take() {
                    None => a,
                    Some(prev) => prev.merge(a),
                });
            }
        }
        let (Some(acked), Some(snapshot)) = (acked, current.as_ref()) else { return Ok(()) };
        gw.apply(snapshot.clone()).await.context("building the runtime")?;
        tracing::debug!(version = snapshot.version, apis = snapshot.apis.len(), "config applied");
        *dirty = true;
        self.ack(gw, Some(snapshot), token, &acked).await;
        Ok(())
    }

    /// Acknowledges what `acked` names: everything after a snapshot, the changed resources
    /// after a delta, nothing but liveness in a heartbeat. Acks stay as small as the change.
    async fn ack(&self, gw: &Gateway, current: Option<&Snapshot>, token: &str, acked: &Acked) {
        let Some(snapshot) = current else { return };
        let rt = gw.runtime();
        let wanted = |id: &String, changed: fn(&Acked) -> Option<&BTreeSet<String>>| match acked {
            Acked::All => true,
            Acked::Nothing => false,
            Acked::Changed { .. } => changed(acked).is_some_and(|c| c.contains(id)),
        };
        let apis = rt
            .report
            .apis
            .iter()
            .filter(|a| wanted(&a.id, Acked::apis))
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
        match self.client.request(req).await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(status = %r.status(), "the controller refused an ack"),
            Err(e) => tracing::debug!(error = %e, "sending an ack"),
        }
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
    fn certificates_from_the_plaintext_stream_are_never_applied() {
        let cert = gatehouse_crds::TlsSecret {
            namespace: "ns".into(),
            name: "c".into(),
            default: true,
            certificate_pem: "CERT".into(),
            private_key_pem: gatehouse_crds::PrivateKeyPem::new("KEY".into()),
            ca_certificate_pem: None,
        };
        let mut snapshot = Snapshot { version: 1, ..Default::default() };
        snapshot.certificates.insert("ns/c".into(), cert.clone());
        let mut current = None;
        on_message(&mut current, StreamMessage::Snapshot { snapshot }).expect("applies");
        assert!(current.as_ref().expect("applied").certificates.is_empty());
        let mut d = gatehouse_crds::protocol::Delta { version: 2, base: 1, ..Default::default() };
        d.certificates.insert("ns/c".into(), Some(cert));
        on_message(&mut current, StreamMessage::Delta(d)).expect("applies");
        let s = current.expect("applied");
        assert_eq!(s.version, 2);
        assert!(s.certificates.is_empty());
    }
}
