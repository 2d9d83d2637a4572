//! A custom auth hook (Tyk's `auth_check`): accepts `Authorization: Bearer <token>` for the
//! tokens in its config, and creates the session the gateway then enforces.
//!
//! ```yaml
//! auth: {type: plugin}
//! middleware:
//!   authCheck:
//!     plugin: custom-auth
//!     symbol: MyPluginAuthCheck
//!     config: {tokens: {"token-1": "user-1"}, rate: 100, perSeconds: 60}
//! ```
use std::{collections::HashMap, time::Duration};

use gatehouse_plugin::{Flow, Hook, Request, SessionInit, declare_plugin, hook};
use serde::Deserialize;

declare_plugin!(hooks: [MyPluginAuthCheck]);
hook!(MyPluginAuthCheck: TokenAuth);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenAuth {
    /// token → user id
    tokens: HashMap<String, String>,
    /// Per-user rate limit: `rate` requests every `perSeconds`.
    rate: Option<u64>,
    #[serde(default = "one")]
    per_seconds: u64,
}

fn one() -> u64 {
    1
}

impl Hook for TokenAuth {
    fn new(config: &str) -> Result<Self, String> {
        serde_json::from_str(config).map_err(|e| format!("custom-auth config: {e}"))
    }

    fn on_request(&self, req: &mut Request) -> Flow {
        let token = req.header("authorization").and_then(|h| h.strip_prefix("Bearer ")).unwrap_or_default();
        let Some(user) = self.tokens.get(token).cloned() else {
            return req.respond(403).json(r#"{"error":"forbidden"}"#);
        };
        let meta = [("user", user.as_str())];
        let alias = format!("token-user {user}");
        // Identity, display name and metadata in one call.
        let mut session = SessionInit::new(&user).alias(&alias).meta(&meta);
        if let Some(rate) = self.rate {
            session = session.rate(rate, Duration::from_secs(self.per_seconds));
        }
        if let Err(e) = req.create_session(&session) {
            return Flow::error(e);
        }
        Flow::Continue
    }
}
