//! Hooks that misbehave on purpose, to show the gateway containing them.
use gatehouse_plugin::{Flow, Hook, Record, Request, declare_plugin, hook};

declare_plugin!(hooks: [Panic, Fail, Forbidden, NeedsConfig, PanicOnDrop, PanicInAnalytics, FailInAnalytics]);
hook!(analytics PanicInAnalytics = panic_in_analytics);
hook!(analytics FailInAnalytics = fail_in_analytics);
hook!(request Panic = panic);
hook!(request Fail = fail);
hook!(request Forbidden = forbidden);
hook!(NeedsConfig: StrictConfig);
hook!(PanicOnDrop: PanicsWhenDropped);

fn panic(req: &mut Request) -> Flow {
    if req.path().ends_with("/ok") {
        return Flow::Continue;
    }
    panic!("this hook panics on purpose");
}

/// Changes the record, then panics: the record is written as it was before this hook.
fn panic_in_analytics(rec: &mut Record) -> Flow {
    rec.add_tag("tagged-before-panic");
    rec.mask("path");
    panic!("this analytics hook panics on purpose");
}

/// Changes the record, then fails: the record is written as it was before this hook.
fn fail_in_analytics(rec: &mut Record) -> Flow {
    rec.add_tag("tagged-before-failing");
    rec.drop_field("method");
    Flow::error("this analytics hook fails on purpose")
}

fn fail(_: &mut Request) -> Flow {
    Flow::error("this hook fails on purpose")
}

/// Fails with its own status: the client gets a 403, the log gets the reason.
fn forbidden(req: &mut Request) -> Flow {
    Flow::error_status(403, format!("tenant of {} not allowed", req.api().name()))
}

/// Refuses to be built unless its config is `{"valid": true}`.
struct StrictConfig;

impl Hook for StrictConfig {
    fn new(config: &str) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(config).map_err(|e| e.to_string())?;
        if v["valid"] == true {
            Ok(StrictConfig)
        } else {
            Err(format!("config must be {{\"valid\": true}}, got {config}"))
        }
    }
}

/// Serves requests, then panics when the gateway drops it (its API changed or went away).
struct PanicsWhenDropped;

impl Hook for PanicsWhenDropped {
    fn new(_config: &str) -> Result<Self, String> {
        Ok(PanicsWhenDropped)
    }
}

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("this hook state panics on purpose when dropped");
    }
}
