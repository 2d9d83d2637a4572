//! Keys: Secrets labelled `gatehouse.dev/key: "true"` holding the token a client sends and
//! the session (limits, quota, access rights, metadata) it grants.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Duration, ResourceError};

/// The label that makes a Secret a Gatehouse key.
pub const KEY_LABEL: &str = "gatehouse.dev/key";

/// What a key grants; the `session.yaml` of a key Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeySession {
    /// Per-key rate limit: `rate` requests every `per`. Unset: no per-key limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<Duration>,
    /// Requests allowed per `quotaRenewal`; -1 means unlimited.
    #[serde(default = "unlimited")]
    pub quota_max: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_renewal: Option<Duration>,
    /// Names of the ApiDefinitions (same namespace) this key may call; empty means none.
    #[serde(default)]
    pub access_rights: Vec<String>,
    #[serde(default)]
    pub meta_data: BTreeMap<String, String>,
    /// RFC 3339 time after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires: Option<jiff::Timestamp>,
}

fn unlimited() -> i64 {
    -1
}

impl Default for KeySession {
    fn default() -> Self {
        Self {
            rate: None,
            per: None,
            quota_max: -1,
            quota_renewal: None,
            access_rights: Vec::new(),
            meta_data: BTreeMap::new(),
            expires: None,
        }
    }
}

impl KeySession {
    pub fn validate(&self, resource: &str) -> Vec<ResourceError> {
        let mut errors = Vec::new();
        let mut err = |field: &str, reason: &str| errors.push(ResourceError::new(resource, field, reason));
        match (self.rate, self.per) {
            (Some(0), _) => err("session.yaml.rate", "must be at least 1"),
            (Some(_), None) => err("session.yaml.per", "is required with rate"),
            (None, Some(_)) => err("session.yaml.rate", "is required with per"),
            (_, Some(p)) if p.0.is_zero() => err("session.yaml.per", "must be greater than zero"),
            _ => {}
        }
        if self.quota_max < -1 {
            err("session.yaml.quotaMax", "must be -1 (unlimited) or at least 0");
        }
        if self.quota_max >= 0 && self.quota_renewal.is_none_or(|r| r.0.is_zero()) {
            err("session.yaml.quotaRenewal", "must be set (and above zero) when quotaMax is not -1");
        }
        errors
    }
}

/// The hex SHA-256 of a raw key: the only form in which keys leave the controller.
pub fn key_hash(raw: &[u8]) -> String {
    hex::encode(Sha256::digest(raw))
}
