//! Tyk's hit counter: answers the request itself with the session, the endpoint and how
//! many times that endpoint was hit, counted in state built once when the plugin loads.
//!
//! ```yaml
//! middleware:
//!   pre: [{plugin: hit-counter, symbol: MyProcessRequest}]
//! ```
use std::{collections::HashMap, sync::Mutex};

use gatehouse_plugin::{Flow, Request, debug, declare_plugin, hook, info, warn};

declare_plugin!(state: Mutex<HashMap<String, u64>> = || Ok(Mutex::default()), hooks: [MyProcessRequest]);
hook!(request MyProcessRequest = my_process_request);

fn my_process_request(req: &mut Request) -> Flow {
    let endpoint = format!("{} {}", req.method(), req.path());
    info!("Custom middleware, new hit: {endpoint}");

    let hit_counter = record_hit(&endpoint);
    debug!("New hit counter value: {hit_counter}");
    if hit_counter > 100 {
        warn!("Hit counter to high");
    }

    let session: serde_json::Value =
        req.session().and_then(|s| serde_json::from_str(s.json()).ok()).unwrap_or_default();
    let reply = serde_json::json!({"session": session, "endpoint": endpoint, "hit_counter": hit_counter});
    req.respond(200).json(reply.to_string())
}

fn record_hit(endpoint: &str) -> u64 {
    let mut hits = state().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let n = hits.entry(endpoint.to_owned()).or_default();
    *n += 1;
    *n
}

#[cfg(test)]
mod tests {
    use gatehouse_plugin::testing::TestCall;

    use super::*;

    #[test]
    fn answers_with_the_endpoint_and_a_growing_count() {
        let _ = super::__GATEHOUSE_STATE.set(Mutex::default());
        let mut call = TestCall::new("GET", "/counted");
        assert_eq!(call.request(my_process_request), Flow::Respond);
        let mut again = TestCall::new("GET", "/counted");
        assert_eq!(again.request(my_process_request), Flow::Respond);
        let body: serde_json::Value =
            serde_json::from_slice(again.response_body.as_deref().unwrap_or_default()).unwrap_or_default();
        assert_eq!(body["endpoint"], "GET /counted");
        assert_eq!(body["hit_counter"], 2);
        assert_eq!(again.response_header("content-type"), Some("application/json"));
    }
}
