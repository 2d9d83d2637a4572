//! The config protocol between controller and dataplanes.
//!
//! A dataplane `GET`s `/v1/stream` with `Authorization: Bearer <ServiceAccount token>` and
//! receives newline-delimited JSON [`StreamMessage`]s: first the whole [`Snapshot`], then one
//! [`Delta`] per change, and a `ping` when idle. It `POST`s an [`Ack`] to `/v1/ack` after each
//! version it applies, and at least every [`HEARTBEAT`] while connected.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    CaSecret,
    snapshot::{ApiEntry, CertificateEntry, KeyEntry, PluginEntry, Snapshot},
};

pub const STREAM_PATH: &str = "/v1/stream";
pub const ACK_PATH: &str = "/v1/ack";
/// Dataplanes ack at least this often; the controller forgets one silent for three times it.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum StreamMessage {
    /// The whole state: replaces whatever the dataplane had.
    Snapshot {
        snapshot: Snapshot,
    },
    /// Changes on top of the previous version.
    Delta(Delta),
    Ping,
}

/// Per-resource changes: `Some` is the new entry, `None` a removal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Delta {
    /// The version this delta produces.
    pub version: u64,
    /// The version it applies to.
    pub base: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub apis: BTreeMap<String, Option<ApiEntry>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, Option<PluginEntry>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub keys: BTreeMap<String, Option<KeyEntry>>,
    /// Certificates (private keys included): only ever on a stream that runs over TLS.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub certificates: BTreeMap<String, Option<CertificateEntry>>,
    /// CA bundles (`ca.crt` of Secrets an upstream's `tls.caSecretRef` names): like
    /// certificates, only ever on a stream that runs over TLS.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ca_certificates: BTreeMap<String, Option<CaSecret>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("delta for version {delta_base} does not apply to version {have}")]
pub struct OutOfOrder {
    pub delta_base: u64,
    pub have: u64,
}

fn apply_map<T: Clone>(to: &mut BTreeMap<String, T>, changes: &BTreeMap<String, Option<T>>) {
    for (id, change) in changes {
        match change {
            Some(v) => {
                to.insert(id.clone(), v.clone());
            }
            None => {
                to.remove(id);
            }
        }
    }
}

impl Snapshot {
    /// Applies a delta made for this version; refuses one made for another.
    pub fn apply(&mut self, d: &Delta) -> Result<(), OutOfOrder> {
        if d.base != self.version {
            return Err(OutOfOrder { delta_base: d.base, have: self.version });
        }
        apply_map(&mut self.apis, &d.apis);
        apply_map(&mut self.plugins, &d.plugins);
        apply_map(&mut self.keys, &d.keys);
        apply_map(&mut self.certificates, &d.certificates);
        apply_map(&mut self.ca_certificates, &d.ca_certificates);
        self.version = d.version;
        Ok(())
    }
}

/// What a dataplane serves, per resource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// Stable name of the dataplane (its pod name).
    pub node: String,
    /// The config version it serves.
    pub version: u64,
    /// Only the resources that changed, to merge into the previous ack (deltas and
    /// heartbeats); false: the whole state (after a snapshot).
    #[serde(default)]
    pub partial: bool,
    pub apis: BTreeMap<String, ResourceResult>,
    pub plugins: BTreeMap<String, ResourceResult>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceResult {
    /// The resource generation this result is for.
    pub generation: i64,
    /// Served (an API) or loaded (a Plugin).
    pub ok: bool,
    /// Why not, when not ok.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_apply_in_order_and_refuse_out_of_order() {
        let mut s = Snapshot { version: 3, ..Default::default() };
        let key = KeyEntry {
            namespace: "ns".into(),
            name: "k".into(),
            hash: "h".into(),
            session: crate::KeySession::default(),
        };
        let add =
            Delta { version: 4, base: 3, keys: BTreeMap::from([("ns/k".into(), Some(key))]), ..Default::default() };
        s.apply(&add).expect("applies");
        assert_eq!((s.version, s.keys.len()), (4, 1));
        assert_eq!(s.apply(&add), Err(OutOfOrder { delta_base: 3, have: 4 }));
        let remove = Delta { version: 5, base: 4, keys: BTreeMap::from([("ns/k".into(), None)]), ..Default::default() };
        s.apply(&remove).expect("applies");
        assert!(s.keys.is_empty());
    }

    #[test]
    fn messages_are_tagged_json() {
        let line = serde_json::to_string(&StreamMessage::Ping).expect("json");
        assert_eq!(line, r#"{"type":"ping"}"#);
    }
}
