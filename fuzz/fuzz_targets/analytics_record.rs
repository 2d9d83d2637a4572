//! Analytics records carry what clients sent (method, path, client address) and what users
//! named things: whatever the strings, a record is written as exactly one line of JSON that
//! reads back field for field.
#![no_main]

use std::sync::Arc;

use gatehouse_dataplane::analytics::{Record, encode_line};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};
use serde_json::Value;

/// The reasons the chain records; `error` is always one of its fixed labels.
const ERRORS: &[&str] = &["auth_missing", "rate_limit", "no_route", "plugin_failure", "upstream_timeout"];

fn record(u: &mut Unstructured<'_>) -> Result<Record> {
    let arc = |u: &mut Unstructured<'_>| -> Result<Option<Arc<str>>> {
        Ok(if u.arbitrary()? { Some(Arc::from(u.arbitrary::<&str>()?)) } else { None })
    };
    // Latencies come from clock readings: finite and not negative.
    let ms = |u: &mut Unstructured<'_>| -> Result<f64> { Ok(f64::from(u.arbitrary::<u32>()?) / 1000.0) };
    Ok(Record {
        time: u.arbitrary()?,
        api_id: arc(u)?,
        api_name: arc(u)?,
        method: u.arbitrary()?,
        path: u.arbitrary()?,
        status: u.arbitrary()?,
        latency_total_ms: ms(u)?,
        latency_upstream_ms: if u.arbitrary()? { Some(ms(u)?) } else { None },
        key_id: arc(u)?,
        key_alias: arc(u)?,
        client_ip: u.arbitrary()?,
        request_bytes: u.arbitrary()?,
        response_bytes: u.arbitrary()?,
        plugin_answered: u.arbitrary()?,
        error: if u.arbitrary()? { Some(*u.choose(ERRORS)?) } else { None },
        tags: u.arbitrary()?,
        session: None,
        hooks: None,
        bodies: None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(r) = record(&mut Unstructured::new(data)) else { return };
    let mut line = Vec::new();
    encode_line(&r, &mut line).expect("every record serialises");
    assert_eq!(line.last(), Some(&b'\n'), "a record ends its line");
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1, "one record, one line: {line:?}");
    assert!(!line.contains(&b'\r'), "no carriage return splits the line: {line:?}");
    let v: Value = serde_json::from_slice(&line).expect("the line is JSON");

    let s = |k: &str| v[k].as_str().map(str::to_owned);
    let arc = |a: &Option<Arc<str>>| a.as_deref().map(str::to_owned);
    assert_eq!(s("time").as_deref(), Some(r.time.as_str()));
    assert_eq!(s("api_id"), arc(&r.api_id));
    assert_eq!(s("api_name"), arc(&r.api_name));
    assert_eq!(s("method").as_deref(), Some(r.method.as_str()));
    assert_eq!(s("path").as_deref(), Some(r.path.as_str()));
    assert_eq!(v["status"].as_u64(), Some(u64::from(r.status)));
    assert_eq!(v["latency_total_ms"].as_f64(), Some(r.latency_total_ms));
    assert_eq!(v["latency_upstream_ms"].as_f64(), r.latency_upstream_ms);
    assert_eq!(s("key_id"), arc(&r.key_id));
    assert_eq!(s("key_alias"), arc(&r.key_alias));
    assert_eq!(s("client_ip").as_deref(), Some(r.client_ip.as_str()));
    assert_eq!(v["request_bytes"].as_u64(), r.request_bytes);
    assert_eq!(v["response_bytes"].as_u64(), r.response_bytes);
    assert_eq!(v["plugin_answered"].as_bool(), Some(r.plugin_answered));
    assert_eq!(s("error").as_deref(), r.error);
    let tags: Vec<&str> = v["tags"].as_array().expect("tags").iter().filter_map(Value::as_str).collect();
    assert_eq!(tags, r.tags);
    assert_eq!(v["meta_data"], serde_json::json!({}), "no session, no metadata");
    assert_eq!(v.as_object().map(|o| o.len()), Some(17), "no field more or less: {v}");
});
