//! One analytics record per request, written off the request path by a dedicated thread,
//! which first runs the API's analytics hooks on it (`gatehouse_plugin_host::analytics`).

use std::{collections::BTreeMap, io::Write, path::Path, sync::Arc};

use bytes::Bytes;
use prometheus::IntCounter;
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

use gatehouse_plugin_host::analytics::{self as hooks, HookRecord, Value};

use crate::{
    body::Capture,
    cli::AnalyticsSink,
    model::{Api, Session},
};

/// What happened to one request. Field names follow Tyk's analytics records where one exists.
#[derive(Serialize)]
pub struct Record {
    /// RFC 3339.
    pub time: String,
    pub api_id: Option<Arc<str>>,
    pub api_name: Option<Arc<str>>,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Request start to response headers, milliseconds.
    pub latency_total_ms: f64,
    pub latency_upstream_ms: Option<f64>,
    /// The key the client sent, when it matched a key Secret: HMAC-SHA256 of its SHA-256
    /// under the installation's secret (see `key_id`). Never the plain hash, which would
    /// let a reader of this file test guesses offline.
    pub key_id: Option<Arc<str>>,
    /// `namespace/name` of the key Secret.
    pub key_alias: Option<Arc<str>>,
    pub client_ip: String,
    /// From Content-Length; absent for streamed bodies of unknown length.
    pub request_bytes: Option<u64>,
    pub response_bytes: Option<u64>,
    /// A plugin answered the request itself; the upstream was not called.
    pub plugin_answered: bool,
    /// Why the gateway ended the request itself, when it did.
    pub error: Option<&'static str>,
    /// Tyk's `Tags`. The gateway adds none itself; analytics hooks add them.
    pub tags: Vec<String>,
    /// Written as `meta_data`: the metadata of the key's session (Tyk's `MetaData`), as
    /// the chain left it (hooks may add to a request's copy).
    #[serde(rename = "meta_data", serialize_with = "session_meta")]
    pub session: Option<Arc<Session>>,
    /// The API whose `middleware.analytics` hooks run on this record before it is
    /// written: the config version that served the request, even after a reload.
    #[serde(skip)]
    pub hooks: Option<Arc<Api>>,
    /// With `detailedRecording`: the bodies as captured.
    #[serde(skip)]
    pub bodies: Option<Bodies>,
}

/// The request and response bodies of a record, each cut at [`BODY_CAP`].
#[derive(Debug)]
pub struct Bodies {
    pub request: Captured,
    pub response: Captured,
}

/// Up to this many bytes of each body go into a record with `detailedRecording`: enough
/// for the JSON documents analytics look at, small enough that records stay cheap.
pub const BODY_CAP: usize = 64 * 1024;

/// One captured body: its first bytes, and whether that is all of it.
#[derive(Debug)]
pub struct Captured {
    pub data: Bytes,
    /// `whole`; `cut` (longer than [`BODY_CAP`]: `data` is its start); `incomplete` (still
    /// streaming or abandoned when the record was written: `data` is what passed).
    pub capture: &'static str,
}

impl Captured {
    pub fn of(c: &Capture) -> Self {
        let (data, seen, ended) = c.taken();
        let capture = if !ended {
            "incomplete"
        } else if seen > data.len() as u64 {
            "cut"
        } else {
            "whole"
        };
        Self { data, capture }
    }
}

fn session_meta<S: Serializer>(s: &Option<Arc<Session>>, ser: S) -> Result<S::Ok, S::Error> {
    static NONE: BTreeMap<String, String> = BTreeMap::new();
    s.as_ref().map_or(&NONE, |s| &s.session.meta_data).serialize(ser)
}

impl Record {
    /// The record as analytics hooks see it: every field by name.
    fn to_hook_record(&self) -> HookRecord {
        let text = |s: &str| Value::Text(s.to_owned());
        let opt = |s: &Option<Arc<str>>| s.as_deref().map_or(Value::Null, text);
        let num = |n: Option<String>| n.map_or(Value::Null, Value::Number);
        let meta = self.session.as_ref().map(|s| s.session.meta_data.clone()).unwrap_or_default();
        let mut h = HookRecord::new(self.tags.clone(), meta);
        h.push("time", text(&self.time));
        h.push("api_id", opt(&self.api_id));
        h.push("api_name", opt(&self.api_name));
        h.push("method", text(&self.method));
        h.push("path", text(&self.path));
        h.push("status", Value::Number(self.status.to_string()));
        h.push("latency_total_ms", num(number(self.latency_total_ms)));
        h.push("latency_upstream_ms", num(self.latency_upstream_ms.and_then(number)));
        h.push("key_id", opt(&self.key_id));
        h.push("key_alias", opt(&self.key_alias));
        h.push("client_ip", text(&self.client_ip));
        h.push("request_bytes", num(self.request_bytes.map(|n| n.to_string())));
        h.push("response_bytes", num(self.response_bytes.map(|n| n.to_string())));
        h.push("plugin_answered", Value::Bool(self.plugin_answered));
        h.push("error", self.error.map_or(Value::Null, text));
        if let Some(b) = &self.bodies {
            h.push("request_body", Value::Body(b.request.data.clone()));
            h.push("request_body_capture", text(b.request.capture));
            h.push("response_body", Value::Body(b.response.data.clone()));
            h.push("response_body_capture", text(b.response.capture));
        }
        h
    }
}

/// A latency as the JSON number serde would write (none for a non-finite one, as serde
/// writes `null`).
fn number(f: f64) -> Option<String> {
    serde_json::Number::from_f64(f).map(|n| n.to_string())
}

/// The sending side; `None` when analytics are off, so the request path skips building
/// records altogether.
#[derive(Clone)]
pub struct Analytics {
    tx: Option<mpsc::Sender<Record>>,
    dropped: IntCounter,
}

/// Records wait here while the writer catches up; past this, they are dropped and counted
/// rather than slowing requests down.
const QUEUE: usize = 16 * 1024;

impl Analytics {
    pub async fn start(sink: &AnalyticsSink, dropped: IntCounter) -> anyhow::Result<Self> {
        let tx = match sink {
            AnalyticsSink::None => None,
            AnalyticsSink::Stdout => Some(spawn_writer(std::io::stdout())?),
            AnalyticsSink::File(path) => Some(spawn_writer(open_append(path)?)?),
        };
        Ok(Self { tx, dropped })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn send(&self, r: Record) {
        if let Some(tx) = &self.tx
            && tx.try_send(r).is_err()
        {
            self.dropped.inc();
        }
    }
}

fn open_append(path: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening analytics file {}", path.display()))
}

/// Replaces `line` with `r` as one JSON object and a newline, after the API's analytics
/// hooks ran on it. JSON escapes every control character inside strings, so whatever a
/// client sent, one record is exactly one line.
pub fn encode_line(r: &Record, line: &mut Vec<u8>) -> serde_json::Result<()> {
    line.clear();
    if r.hooks.is_some() || r.bodies.is_some() {
        let mut h = r.to_hook_record();
        if let Some(api) = &r.hooks {
            hooks::run(&**api, &api.plugins.analytics, &mut h);
        }
        serde_json::to_writer(&mut *line, &h.to_json())?;
    } else {
        serde_json::to_writer(&mut *line, r)?;
    }
    line.push(b'\n');
    Ok(())
}

/// The writer runs on its own thread: analytics hooks are plugin code that may block, and
/// must never hold a worker thread that serves requests.
fn spawn_writer<W: Write + Send + 'static>(w: W) -> anyhow::Result<mpsc::Sender<Record>> {
    let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
    std::thread::Builder::new().name("gatehouse-analytics".to_owned()).spawn(move || {
        let mut out = std::io::BufWriter::new(w);
        let mut line = Vec::with_capacity(512);
        while let Some(r) = rx.blocking_recv() {
            let mut next = Some(r);
            // Write what is queued, then flush once: records reach the file promptly without
            // a syscall per record under load.
            while let Some(r) = next {
                if encode_line(&r, &mut line).is_ok()
                    && let Err(e) = out.write_all(&line)
                {
                    tracing::error!(error = %e, "writing analytics");
                }
                // Dropped here, on this thread: the last record of an old config version
                // may hold its plugin instances, whose `destroy` then runs here too.
                drop(r);
                next = rx.try_recv().ok();
            }
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "flushing analytics");
            }
        }
    })?;
    Ok(tx)
}
