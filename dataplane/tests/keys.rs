//! Key hygiene over real HTTP: credentials stop at the gateway, and analytics identify keys
//! by name and keyed id, never by the plain SHA-256 of the key.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use hmac::{Hmac, Mac};
use http::StatusCode;
use sha2::{Digest, Sha256};

fn auth(token: &str) -> String {
    format!("  auth: {{type: authToken, authToken: {token}}}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_stripped_in_header_query_and_cookie_forms_unless_told_not_to() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let text = [
        api("h", "/h/", &up.url(), &auth("{header: X-Api-Key}")),
        api("q", "/q/", &up.url(), &auth("{header: '', query: key}")),
        api("c", "/c/", &up.url(), &auth("{header: '', cookie: session}")),
        api(
            "keep",
            "/keep/",
            &up.url(),
            &auth("{header: X-Api-Key, query: key, cookie: session, stripCredentials: false}"),
        ),
        api("open", "/open/", &up.url(), ""),
        key("alice", "alice-token", "accessRights: [h, q, c, keep]"),
    ];
    cfg.write("apis.yaml", &text.concat());
    let gw = Gatehouse::start(cfg.path(), &[]).await;

    let r = gw.get_with("/h/x", &[("x-api-key", "alice-token"), ("x-other", "kept")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = r.json();
    assert!(seen["headers"].get("x-api-key").is_none(), "header credential forwarded: {seen}");
    assert_eq!(seen["headers"]["x-other"], "kept");

    let r = gw.get("/q/x?a=1&key=alice-token&b=2").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["query"], "a=1&b=2", "only the credential parameter goes");
    let r = gw.get("/q/x?key=alice-token").await;
    assert_eq!(r.json()["query"], serde_json::Value::Null, "an emptied query goes altogether");

    let r = gw.get_with("/c/x", &[("cookie", "theme=dark; session=alice-token; lang=en")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["headers"]["cookie"], "theme=dark; lang=en", "only the credential cookie goes");
    let r = gw.get_with("/c/x", &[("cookie", "session=alice-token")]).await;
    assert!(r.json()["headers"].get("cookie").is_none(), "an emptied Cookie header goes altogether");

    // `stripCredentials: false`: everything reaches the upstream as sent.
    let r = gw
        .get_with("/keep/x?key=alice-token&a=1", &[("x-api-key", "alice-token"), ("cookie", "session=alice-token")])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = r.json();
    assert_eq!(seen["headers"]["x-api-key"], "alice-token");
    assert_eq!(seen["query"], "key=alice-token&a=1");
    assert_eq!(seen["headers"]["cookie"], "session=alice-token");

    // A refused key is refused as before, and the other APIs keep working.
    let r = gw.get_with("/h/x", &[("x-api-key", "wrong")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.get("/open/x").await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/h/x", &[("x-api-key", "alice-token")]).await.status, StatusCode::OK);
}

fn keyed_id(secret: &[u8], token: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    mac.update(&Sha256::digest(token.as_bytes()));
    hex::encode(mac.finalize().into_bytes())
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_carry_the_alias_and_a_keyed_id_never_the_plain_key_hash() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("analytics.jsonl");
    let secret = out_dir.path().join("key-id-secret");
    std::fs::write(&secret, "a-test-installation-secret\n").unwrap();
    let token = "alice-token-0123456789";
    let plain = hex::encode(Sha256::digest(token.as_bytes()));
    let text = [
        api("a", "/a/", &up.url(), &auth("{header: X-Api-Key}")),
        key("alice", token, "accessRights: [a]"),
        key("bob", "bob-token", "accessRights: []"),
    ];
    cfg.write("apis.yaml", &text.concat());
    let analytics = format!("--analytics=file:{}", out.display());
    let secret_flag = format!("--key-id-secret-file={}", secret.display());
    let gw = Gatehouse::start(cfg.path(), &[&analytics, &secret_flag]).await;

    assert_eq!(gw.get_with("/a/x", &[("x-api-key", token)]).await.status, StatusCode::OK);
    assert_eq!(gw.get_with("/a/x", &[("x-api-key", "bob-token")]).await.status, StatusCode::FORBIDDEN);
    assert_eq!(gw.get("/a/x").await.status, StatusCode::UNAUTHORIZED);
    gw.wait_until("three analytics records", async || records(&out).len() >= 3).await;

    let r = records(&out);
    assert_eq!(r[0]["key_alias"], "default/alice");
    assert_eq!(r[0]["key_id"], keyed_id(b"a-test-installation-secret", token), "HMAC-SHA256 of the key's hash");
    assert_eq!(r[1]["key_alias"], "default/bob", "refused after the lookup: still named");
    assert_eq!(r[1]["key_id"], keyed_id(b"a-test-installation-secret", "bob-token"));
    assert_eq!(r[2]["key_alias"], serde_json::Value::Null);
    assert!(r[0].get("key_hash").is_none(), "{}", r[0]);

    let file = std::fs::read_to_string(&out).unwrap();
    for (what, text) in [("analytics file", &file), ("gateway log", &gw.logs())] {
        assert!(!text.contains(&plain), "the plain SHA-256 of the key is in the {what}");
        assert!(!text.contains(token), "the raw key is in the {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_key_id_secret_is_kept_in_the_state_dir_across_restarts() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    cfg.write(
        "apis.yaml",
        &[api("a", "/a/", &up.url(), &auth("{header: X-Api-Key}")), key("alice", "t0ken", "accessRights: [a]")]
            .concat(),
    );
    let mut ids = Vec::new();
    for run in 0..2 {
        let out = dir.path().join(format!("analytics-{run}.jsonl"));
        let analytics = format!("--analytics=file:{}", out.display());
        let state_flag = format!("--state-dir={}", state.display());
        let mut gw = Gatehouse::start(cfg.path(), &[&analytics, &state_flag]).await;
        assert_eq!(gw.get_with("/a/x", &[("x-api-key", "t0ken")]).await.status, StatusCode::OK);
        gw.wait_until("a record", async || !records(&out).is_empty()).await;
        ids.push(records(&out)[0]["key_id"].as_str().unwrap().to_owned());
        assert!(gw.terminate().success());
    }
    assert_eq!(ids[0], ids[1], "the same key keeps its id across a restart");
    assert_ne!(ids[0], hex::encode(Sha256::digest(b"t0ken")));
    let kept = std::fs::read_to_string(state.join("key-id-secret")).unwrap();
    assert_eq!(ids[0], keyed_id(kept.trim().as_bytes(), "t0ken"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_short_key_id_secret_is_a_clear_startup_error() {
    let cfg = ConfigDir::new();
    cfg.write("apis.yaml", &api("a", "/a/", "http://127.0.0.1:1", ""));
    let secret = cfg.path().join("short-secret");
    std::fs::write(&secret, "short").unwrap();
    let out = std::process::Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--config"])
        .arg(cfg.path())
        .arg(format!("--key-id-secret-file={}", secret.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("short-secret: the key id secret holds 5 bytes; at least 16 are needed"), "{err}");
}
