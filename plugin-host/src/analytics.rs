//! The analytics phase (Tyk's analytics plugins): `middleware.analytics` hooks see each
//! analytics record of their API before it is written. They run on the analytics writer's
//! thread, never on the request path: a slow hook slows analytics, not requests.
//!
//! Hooks see the record as named fields with text values ([`HookRecord`]), so a plugin in
//! any language reads and masks it without knowing the host's types. The dataplane builds a
//! `HookRecord` from its own record and writes what the hooks leave; the writer thread and
//! the sink are the dataplane's.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use bytes::Bytes;
use gatehouse_plugin::abi;
use quanta::Instant;

use super::{HookApi, HookCall};

/// What a field holds, which decides what `record_set` accepts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Number,
    Bool,
    Body,
}

/// Every field a hook may read or set, with its kind. Field names are the record's own.
const FIELDS: &[(&str, Kind)] = &[
    ("time", Kind::Text),
    ("api_id", Kind::Text),
    ("api_name", Kind::Text),
    ("method", Kind::Text),
    ("path", Kind::Text),
    ("status", Kind::Number),
    ("latency_total_ms", Kind::Number),
    ("latency_upstream_ms", Kind::Number),
    ("key_id", Kind::Text),
    ("key_alias", Kind::Text),
    ("client_ip", Kind::Text),
    ("request_bytes", Kind::Number),
    ("response_bytes", Kind::Number),
    ("plugin_answered", Kind::Bool),
    ("error", Kind::Text),
    ("request_body", Kind::Body),
    ("request_body_capture", Kind::Text),
    ("response_body", Kind::Body),
    ("response_body_capture", Kind::Text),
];

fn known(name: &[u8]) -> Option<(&'static str, Kind)> {
    FIELDS.iter().copied().find(|(n, _)| n.as_bytes() == name)
}

/// A field's value. Numbers keep their text, so a hook reads them as the sink will write
/// them and the host hands out a view, not a formatted copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Text(String),
    Number(String),
    Bool(bool),
    Body(Bytes),
}

/// One record as analytics hooks see and change it.
#[derive(Debug, Clone, PartialEq)]
pub struct HookRecord {
    fields: Vec<(&'static str, Value)>,
    /// `None` once a hook dropped it.
    tags: Option<Vec<String>>,
    meta: Option<BTreeMap<String, String>>,
}

impl HookRecord {
    pub fn new(tags: Vec<String>, meta: BTreeMap<String, String>) -> Self {
        Self { fields: Vec::with_capacity(FIELDS.len()), tags: Some(tags), meta: Some(meta) }
    }

    /// Adds a field while the record is built; names outside `FIELDS` are ignored.
    pub fn push(&mut self, name: &'static str, value: Value) {
        if known(name.as_bytes()).is_some() {
            self.fields.push((name, value));
        }
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.fields.iter().position(|(n, _)| n.as_bytes() == name)
    }

    /// The field's value as bytes: numbers as written, booleans as `true`/`false`; none
    /// when absent, dropped or null.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        match &self.fields[self.find(name)?].1 {
            Value::Null => None,
            Value::Text(s) | Value::Number(s) => Some(s.as_bytes()),
            Value::Bool(b) => Some(if *b { b"true" } else { b"false" }),
            Value::Body(b) => Some(b),
        }
    }

    /// Sets (or brings back) a known field, if `value` fits its kind.
    pub fn set(&mut self, name: &[u8], value: &[u8]) -> Result<(), String> {
        let Some((name, kind)) = known(name) else {
            return Err(format!("no record field is named {:?}", String::from_utf8_lossy(name)));
        };
        let text = || std::str::from_utf8(value).map(str::to_owned).map_err(|_| format!("{name} takes UTF-8 text"));
        let value = match kind {
            Kind::Text => Value::Text(text()?),
            Kind::Number => {
                let t = text()?;
                serde_json::from_str::<serde_json::Number>(&t).map_err(|_| format!("{name} takes a number"))?;
                Value::Number(t)
            }
            Kind::Bool => match value {
                b"true" => Value::Bool(true),
                b"false" => Value::Bool(false),
                _ => return Err(format!("{name} takes true or false")),
            },
            Kind::Body => Value::Body(Bytes::copy_from_slice(value)),
        };
        match self.find(name.as_bytes()) {
            Some(i) => self.fields[i].1 = value,
            None => self.fields.push((name, value)),
        }
        Ok(())
    }

    /// Removes a field, `tags` or `meta_data`; whether it was there.
    pub fn drop_field(&mut self, name: &[u8]) -> bool {
        match name {
            b"tags" => self.tags.take().is_some(),
            b"meta_data" => self.meta.take().is_some(),
            _ => match self.find(name) {
                Some(i) => {
                    self.fields.remove(i);
                    true
                }
                None => false,
            },
        }
    }

    pub fn add_tag(&mut self, tag: String) {
        self.tags.get_or_insert_default().push(tag);
    }

    pub fn set_meta(&mut self, key: String, value: String) {
        self.meta.get_or_insert_default().insert(key, value);
    }

    /// The record as the sink writes it. A body that is not UTF-8 is written in base64,
    /// with `<field>_encoding: "base64"` beside it.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine;
        let mut out = serde_json::Map::new();
        for (name, value) in &self.fields {
            let v = match value {
                Value::Null => serde_json::Value::Null,
                Value::Text(s) => s.as_str().into(),
                Value::Number(s) => serde_json::from_str(s).unwrap_or(serde_json::Value::Null),
                Value::Bool(b) => (*b).into(),
                Value::Body(b) => match std::str::from_utf8(b) {
                    Ok(s) => s.into(),
                    Err(_) => {
                        out.insert(format!("{name}_encoding"), "base64".into());
                        base64::engine::general_purpose::STANDARD.encode(b).into()
                    }
                },
            };
            out.insert((*name).to_owned(), v);
        }
        if let Some(tags) = &self.tags {
            out.insert("tags".to_owned(), tags.clone().into());
        }
        if let Some(meta) = &self.meta {
            let meta = meta.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect();
            out.insert("meta_data".to_owned(), serde_json::Value::Object(meta));
        }
        serde_json::Value::Object(out)
    }
}

/// The host's side of one analytics hook call; `gh_call` points at it.
pub struct RecordCtx<'a> {
    pub(super) rec: &'a mut HookRecord,
    pub(super) api: &'a dyn HookApi,
    pub(super) hook: &'a HookCall,
    pub(super) error: Option<String>,
}

/// Runs `hooks` (an API's `middleware.analytics`, bound for `api`) on `rec`, in order. A
/// hook that fails or panics is counted and logged (once per hook), and the record goes on
/// as it was before that hook.
pub fn run(api: &dyn HookApi, hooks: &[HookCall], rec: &mut HookRecord) {
    if hooks.is_empty() {
        return;
    }
    let mut at = Instant::now();
    for h in hooks {
        let before = rec.clone();
        let mut ctx = RecordCtx { rec: &mut *rec, api, hook: h, error: None };
        let status = h.instance.call_analytics(&mut ctx);
        let error = ctx.error.take();
        let ended = Instant::now();
        h.duration.observe((ended - at).as_secs_f64());
        at = ended;
        if status == abi::GH_CONTINUE || status == abi::GH_RESPOND {
            continue;
        }
        *rec = before;
        let counter = if status == abi::GH_PANIC { &h.panics } else { &h.errors };
        counter.inc();
        if !h.failure_logged.swap(true, Ordering::Relaxed) {
            let reason = error.unwrap_or_else(|| format!("hook returned status {status}"));
            tracing::warn!(api = %api.id(), plugin = %h.path, symbol = %h.symbol, phase = %h.phase, %reason, "analytics hook failed; the record is written as it was before it (logged once per hook, every failure is counted in gatehouse_plugin_failures_total)");
        }
    }
}

impl RecordCtx<'_> {
    pub(super) fn log(&self, level: abi::gh_level, msg: &str) {
        super::log_for_hook(self.api, self.hook, level, msg);
    }

    /// A refused change, logged at debug: a hook probing field names is not an incident.
    pub(super) fn refused(&self, what: &str, why: &str) {
        self.log(abi::GH_LOG_DEBUG, &format!("{what} refused: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> HookRecord {
        let mut r = HookRecord::new(vec![], BTreeMap::new());
        r.push("method", Value::Text("GET".into()));
        r.push("status", Value::Number("200".into()));
        r.push("plugin_answered", Value::Bool(false));
        r.push("error", Value::Null);
        r
    }

    #[test]
    fn fields_read_as_text_and_take_only_values_of_their_kind() {
        let mut r = record();
        assert_eq!(r.get(b"status"), Some(&b"200"[..]));
        assert_eq!(r.get(b"plugin_answered"), Some(&b"false"[..]));
        assert_eq!(r.get(b"error"), None, "null reads as absent");
        assert!(r.set(b"status", b"two hundred").is_err());
        assert!(r.set(b"plugin_answered", b"yes").is_err());
        assert!(r.set(b"nonsense", b"x").is_err());
        assert!(r.set(b"method", b"\xff").is_err());
        r.set(b"status", b"404").expect("a number");
        r.set(b"request_body", b"\xff\x00").expect("any bytes");
        let j = r.to_json();
        assert_eq!(j["status"], 404);
        assert_eq!((j["request_body"].as_str(), j["request_body_encoding"].as_str()), (Some("/wA="), Some("base64")));
    }

    #[test]
    fn dropped_fields_tags_and_meta_leave_the_json() {
        let mut r = record();
        assert!(r.drop_field(b"method"));
        assert!(!r.drop_field(b"method"));
        r.add_tag("a".into());
        r.set_meta("k".into(), "v".into());
        let j = r.to_json();
        assert!(j.get("method").is_none());
        assert_eq!((j["tags"][0].as_str(), j["meta_data"]["k"].as_str()), (Some("a"), Some("v")));
        assert!(r.drop_field(b"tags") && r.drop_field(b"meta_data"));
        let j = r.to_json();
        assert!(j.get("tags").is_none() && j.get("meta_data").is_none());
    }
}
