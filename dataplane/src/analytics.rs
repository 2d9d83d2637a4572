//! One analytics record per request, written off the request path by a background task.

use std::{path::Path, sync::Arc};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt, BufWriter},
    sync::mpsc,
};

use crate::cli::AnalyticsSink;

/// What happened to one request. Field names follow Tyk's analytics records where one exists.
#[derive(Debug, Serialize)]
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
            AnalyticsSink::Stdout => Some(spawn_writer(tokio::io::stdout())),
            AnalyticsSink::File(path) => Some(spawn_writer(open_append(path).await?)),
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

async fn open_append(path: &Path) -> anyhow::Result<tokio::fs::File> {
    use anyhow::Context;
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .with_context(|| format!("opening analytics file {}", path.display()))
}

/// Replaces `line` with `r` as one JSON object and a newline. JSON escapes every control
/// character inside strings, so whatever a client sent, one record is exactly one line.
pub fn encode_line(r: &Record, line: &mut Vec<u8>) -> serde_json::Result<()> {
    line.clear();
    serde_json::to_writer(&mut *line, r)?;
    line.push(b'\n');
    Ok(())
}

fn spawn_writer<W: AsyncWrite + Unpin + Send + 'static>(w: W) -> mpsc::Sender<Record> {
    let (tx, mut rx) = mpsc::channel::<Record>(QUEUE);
    tokio::spawn(async move {
        let mut out = BufWriter::new(w);
        let mut line = Vec::with_capacity(512);
        while let Some(r) = rx.recv().await {
            let mut next = Some(r);
            // Write what is queued, then flush once: records reach the file promptly without
            // a syscall per record under load.
            while let Some(r) = next {
                if encode_line(&r, &mut line).is_ok()
                    && let Err(e) = out.write_all(&line).await
                {
                    tracing::error!(error = %e, "writing analytics");
                }
                next = rx.try_recv().ok();
            }
            if let Err(e) = out.flush().await {
                tracing::error!(error = %e, "flushing analytics");
            }
        }
    });
    tx
}
