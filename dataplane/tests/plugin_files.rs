//! Plugin files the user gets wrong: overwritten in place while the gateway watches them,
//! truncated, garbage, naming symbols the plugin does not define, linking symbols nothing
//! defines, a plugin directory others control, hook state that panics when dropped. Each
//! over real HTTP against the real gateway: the gateway keeps serving, says why, and the
//! other APIs keep working.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::Write,
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use http::StatusCode;

fn mw(phase: &str, plugin: &str, symbol: &str) -> String {
    format!("  middleware:\n    {phase}: [{{plugin: {plugin}, symbol: {symbol}}}]\n")
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The `/config` entry of a Plugin.
fn plugin_state(config: &serde_json::Value, id: &str) -> serde_json::Value {
    config["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no Plugin {id} in {config}"))
}

/// Replaces `path` the way a deploy does (write beside it, rename over it).
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until the Plugin's `/config` state satisfies `pred`, and returns the entry.
async fn wait_plugin(
    gw: &Gatehouse,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    gw.wait_until(what, async || {
        last = plugin_state(&gw.config().await, id);
        pred(&last)
    })
    .await;
    last
}

async fn version_header(gw: &Gatehouse, path: &str) -> (StatusCode, String) {
    let r = gw.get(path).await;
    let v = if r.status == StatusCode::OK {
        r.json()["headers"]["x-c-plugin-version"].as_str().unwrap_or_default().to_owned()
    } else {
        r.text()
    };
    (r.status, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_overwritten_in_place_in_chunks_under_load_never_fails_a_request() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib = lib_dir.path().join("libbig.so");
    std::fs::copy(p.c("big_v1"), &lib).unwrap();
    let v2 = std::fs::read(p.c("big_v2")).unwrap();
    assert!(v2.len() > 1 << 20, "the fixture is big enough to take many writes: {} bytes", v2.len());
    cfg.write(
        "all.yaml",
        &[
            plugin("big", &lib.display().to_string(), ""),
            api("a", "/a/", &up.url(), &mw("pre", "big", "AddHeader")),
            api("other", "/other/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Arc::new(Gatehouse::start(cfg.path(), &[]).await);
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v1".to_owned()));

    let stop = Arc::new(AtomicBool::new(false));
    let (failed, v2_seen, sent) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut load = Vec::new();
    for i in 0..4 {
        let (gw, stop, failed, v2_seen, sent, first_failure) =
            (gw.clone(), stop.clone(), failed.clone(), v2_seen.clone(), sent.clone(), first_failure.clone());
        load.push(tokio::spawn(async move {
            let path = if i == 3 { "/other/x" } else { "/a/x" };
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                let (status, version) = version_header(&gw, path).await;
                match (status, version.as_str(), path) {
                    (StatusCode::OK, "v2", _) => {
                        v2_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    (StatusCode::OK, "v1", _) | (StatusCode::OK, "", "/other/x") => {}
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        first_failure.lock().unwrap().get_or_insert(format!("{path}: {status} {version}"));
                    }
                }
            }
        }));
    }
    // Overwrite in place, as scp or a slow cp does: same inode, truncated first, then
    // written in 64 KiB pieces with pauses, each fsynced; no rename.
    let target = lib.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&target).unwrap();
        for chunk in v2.chunks(64 * 1024) {
            f.write_all(chunk).unwrap();
            f.sync_data().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        v2
    });
    let v2 = writer.await.unwrap();
    gw.wait_until("the new version to be served once complete", async || v2_seen.load(Ordering::Relaxed) > 10).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed while the file was rewritten ({} sent); first: {:?}",
        sent.load(Ordering::Relaxed),
        first_failure.lock().unwrap()
    );
    let logs = gw.logs();
    eprintln!(
        "{} requests while a {}-byte plugin was rewritten in place; refused while still being written: {}, as truncated: {}",
        sent.load(Ordering::Relaxed),
        v2.len(),
        logs.matches("still being written (").count(),
        logs.matches("extends past the end").count(),
    );
    let state = wait_plugin(&gw, "default/big", "the complete file to be loaded", |s| s["state"] == "loaded").await;
    assert_eq!(state["sha256"], sha256(&v2), "serving exactly the complete new content");
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v2".to_owned()));
    assert_eq!(gw.get("/other/x").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_garbage_files_are_refused_while_the_old_version_serves() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let lib_dir = tempfile::tempdir().unwrap();
    let (cut, junk) = (lib_dir.path().join("libcut.so"), lib_dir.path().join("libjunk.so"));
    let v1 = std::fs::read(p.c("big_v1")).unwrap();
    std::fs::write(&cut, &v1).unwrap();
    std::fs::write(&junk, &v1).unwrap();
    cfg.write(
        "all.yaml",
        &[
            plugin("cut", &cut.display().to_string(), ""),
            plugin("junk", &junk.display().to_string(), ""),
            api("cut", "/cut/", &up.url(), &mw("pre", "cut", "AddHeader")),
            api("junk", "/junk/", &up.url(), &mw("pre", "junk", "AddHeader")),
            api("other", "/other/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(version_header(&gw, "/cut/x").await, (StatusCode::OK, "v1".to_owned()));

    let v2 = std::fs::read(p.c("big_v2")).unwrap();
    let half = &v2[..v2.len() / 2];
    replace(&cut, half);
    let garbage: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    replace(&junk, &garbage);

    let old = sha256(&v1);
    let s = wait_plugin(&gw, "default/cut", "the truncated file to be refused", |s| {
        s["state"].as_str().unwrap_or_default().contains("refused")
    })
    .await;
    let state = s["state"].as_str().unwrap();
    assert!(state.starts_with(&format!("serving {old}; new content {} refused: ", sha256(half))), "{state}");
    assert!(state.contains("not a loadable shared object: a loadable segment"), "{state}");
    assert!(state.contains("extends past the end of the file"), "{state}");
    assert_eq!(s["sha256"], old, "the served content is the old one");
    let s = wait_plugin(&gw, "default/junk", "the garbage file to be refused", |s| {
        s["state"].as_str().unwrap_or_default().contains("refused")
    })
    .await;
    let state = s["state"].as_str().unwrap();
    assert!(state.starts_with(&format!("serving {old}; new content {} refused: ", sha256(&garbage))), "{state}");
    assert!(state.ends_with("not a loadable shared object: not an ELF file"), "{state}");

    assert_eq!(version_header(&gw, "/cut/x").await, (StatusCode::OK, "v1".to_owned()), "the old version serves");
    assert_eq!(version_header(&gw, "/junk/x").await, (StatusCode::OK, "v1".to_owned()));
    assert_eq!(gw.get("/other/x").await.status, StatusCode::OK);
    let line = gw
        .wait_for_log("a log line about the refused file", |l| {
            l.contains("serving its previous version")
                && l.contains("default/cut")
                && l.contains("extends past the end")
        })
        .await;
    assert!(line.contains(&old), "the log names the version still served: {line}");

    // The complete file is loaded once it is there.
    replace(&cut, &v2);
    wait_plugin(&gw, "default/cut", "the complete file to be loaded", |s| s["state"] == "loaded").await;
    assert_eq!(version_header(&gw, "/cut/x").await, (StatusCode::OK, "v2".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symbols_the_plugin_does_not_define_as_hooks_are_refused() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            // An ABI 1.0 plugin (hooks looked up by symbol): it links libc, so `dlsym` on it
            // finds libc's symbols too.
            plugin("bad", &p.c("abi10"), ""),
            // An ABI 1.1 plugin: only its own find_hook names hooks.
            plugin("c11", &p.c("c_add_header"), ""),
            plugin("rust", &p.rust("foo-bar-header"), ""),
            // A libc function, a libc data object, the plugin's declaration, and a Rust
            // plugin's own function that is not a hook table.
            api("malloc", "/malloc/", &up.url(), &mw("pre", "bad", "malloc")),
            api("environ", "/environ/", &up.url(), &mw("pre", "bad", "environ")),
            api("decl", "/decl/", &up.url(), &mw("pre", "bad", "gatehouse_plugin")),
            api("ok", "/ok/", &up.url(), &mw("pre", "bad", "AddHeader10")),
            api("malloc11", "/malloc11/", &up.url(), &mw("pre", "c11", "malloc")),
            api("foo", "/foo/", &up.url(), &mw("pre", "rust", "AddFooBarHeader")),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let state = gw.config().await;
    for symbol in ["malloc", "environ"] {
        let r = gw.get(&format!("/{symbol}/x")).await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"), "{symbol}");
        let s = api_state(&state, &format!("default/{symbol}"));
        assert!(
            s.contains(&format!("Plugin default/bad, symbol {symbol:?}: symbol {symbol:?} is not a Gatehouse hook: the plugin's own dynamic symbol table does not define it; it resolves into ")),
            "{s}"
        );
        assert!(s.contains("libc.so"), "names the library it came from: {s}");
    }
    let s = api_state(&state, "default/decl");
    assert!(s.contains("symbol \"gatehouse_plugin\" not found"), "{s}");
    assert_eq!(gw.get("/ok/x").await.status, StatusCode::OK, "the plugin's own hook works");
    let s = api_state(&state, "default/malloc11");
    assert!(s.contains("symbol \"malloc\" not found: the plugin's find_hook does not know it"), "{s}");
    assert_eq!(gw.get("/foo/x").await.json()["headers"]["foo"], "Bar", "a Rust SDK hook passes the checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_with_an_undefined_symbol_is_refused_with_dlerrors_text() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("undef", &p.c("bad_undefined"), ""),
            api("undef", "/undef/", &up.url(), &mw("pre", "undef", "CallsMissing")),
            api("other", "/other/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let r = gw.get("/undef/x").await;
    assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"));
    let state = gw.config().await;
    let s = plugin_state(&state, "default/undef")["state"].as_str().unwrap().to_owned();
    assert!(s.starts_with("the dynamic loader refused it: "), "{s}");
    assert!(s.contains("undefined symbol: gh_fixture_not_defined_anywhere"), "dlerror's own text: {s}");
    assert!(api_state(&state, "default/undef").contains("undefined symbol: gh_fixture_not_defined_anywhere"));
    assert_eq!(gw.get("/other/x").await.status, StatusCode::OK);
    gw.wait_for_log_containing("gh_fixture_not_defined_anywhere").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_be_loaded_keeps_the_previous_version_serving() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let lib_dir = tempfile::tempdir().unwrap();
    let lib = lib_dir.path().join("libc_add_header.so");
    let v1 = std::fs::read(p.c("c_add_header_v1")).unwrap();
    std::fs::write(&lib, &v1).unwrap();
    cfg.write(
        "all.yaml",
        &[
            plugin("c", &lib.display().to_string(), ""),
            api("a", "/a/", &up.url(), &mw("pre", "c", "AddHeader")),
            api("other", "/other/", &up.url(), ""),
        ]
        .concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v1".to_owned()));
    let old = sha256(&v1);

    // New content whose init refuses the load, then one the dynamic loader refuses.
    for (fixture, reason) in [
        ("bad_init", "init failed: cannot reach the license server"),
        ("bad_undefined", "the dynamic loader refused it: "),
        ("bad_abi", "built for plugin ABI 2.x"),
    ] {
        let bytes = std::fs::read(p.c(fixture)).unwrap();
        replace(&lib, &bytes);
        let want = format!("serving {old}; new content {} refused: {reason}", sha256(&bytes));
        let s = wait_plugin(&gw, "default/c", &format!("{fixture} to be refused"), |s| {
            s["state"].as_str().unwrap_or_default().starts_with(&want)
        })
        .await;
        assert_eq!(s["sha256"], old, "{fixture}");
        assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v1".to_owned()), "{fixture}");
        assert_eq!(gw.get("/other/x").await.status, StatusCode::OK);
        let api = api_state(&gw.config().await, "default/a");
        assert_eq!(api, "serving", "{fixture}: the API is served as before");
    }
    // Good content again is loaded.
    let v2 = std::fs::read(p.c("c_add_header_v2")).unwrap();
    replace(&lib, &v2);
    wait_plugin(&gw, "default/c", "v2 to be loaded", |s| s["state"] == "loaded" && s["sha256"] == sha256(&v2)).await;
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v2".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_directory_others_can_write_or_own_is_refused() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[
            plugin("c", &p.c("c_add_header_v1"), ""),
            api("a", "/a/", &up.url(), &mw("pre", "c", "AddHeader")),
            api("other", "/other/", &up.url(), ""),
        ]
        .concat(),
    );
    let root = tempfile::tempdir().unwrap();
    let open_dir = root.path().join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cases = vec![(open_dir.clone(), "writable by everyone (mode 777)".to_owned())];
    // Only root can give a directory away; as another user, the mode case is enough.
    let root_user = std::process::Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if root_user {
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        let ok = std::process::Command::new("chown").arg("65534").arg(&theirs).status().unwrap().success();
        assert!(ok, "chown the directory to uid 65534");
        cases.push((theirs, "owned by uid 65534, not by the gateway's uid 0".to_owned()));
    }
    for (dir, reason) in cases {
        let flag = format!("--plugin-dir={}", dir.display());
        let gw = Gatehouse::start(cfg.path(), &[&flag]).await;
        let r = gw.get("/a/x").await;
        assert_eq!((r.status, r.error().as_str()), (StatusCode::INTERNAL_SERVER_ERROR, "plugin failure"), "{reason}");
        let s = plugin_state(&gw.config().await, "default/c")["state"].as_str().unwrap().to_owned();
        assert!(s.starts_with(&format!("cannot use the plugin directory: {}: ", dir.display())), "{s}");
        assert!(s.contains(&reason), "expected {reason:?} in {s:?}");
        assert_eq!(gw.get("/other/x").await.status, StatusCode::OK);
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none(), "nothing was written into it");
        gw.wait_for_log_containing("cannot use the plugin directory").await;
    }
    // Once fixed, the next check loads the plugin.
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let flag = format!("--plugin-dir={}", open_dir.display());
    let gw = Gatehouse::start(cfg.path(), &[&flag]).await;
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v1".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_plugin_directory_and_a_damaged_copy_are_recovered_from() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write(
        "all.yaml",
        &[plugin("c", &p.c("c_add_header_v1"), ""), api("a", "/a/", &up.url(), &mw("pre", "c", "AddHeader"))].concat(),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    // A copy left by an earlier run, since truncated: it must not be trusted by its name.
    let v1 = std::fs::read(p.c("c_add_header_v1")).unwrap();
    let copy = dir.path().join(format!("{}.so", sha256(&v1)));
    std::fs::write(&copy, &v1[..v1.len() / 3]).unwrap();
    let flag = format!("--plugin-dir={}", dir.path().display());
    let gw = Gatehouse::start(cfg.path(), &[&flag]).await;
    assert_eq!(gw.get("/a/x").await.status, StatusCode::INTERNAL_SERVER_ERROR);

    // Fixed while the gateway runs: retried without any other change.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    wait_plugin(&gw, "default/c", "the plugin to load once the directory is fixed", |s| s["state"] == "loaded").await;
    assert_eq!(version_header(&gw, "/a/x").await, (StatusCode::OK, "v1".to_owned()));
    assert_eq!(sha256(&std::fs::read(&copy).unwrap()), sha256(&v1), "the damaged copy was written again");
    gw.wait_for_log_containing("does not match its content hash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_when_hook_state_is_dropped_does_not_take_the_gateway_down() {
    let p = plugins();
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    let faulty = plugin("faulty", &p.rust("faulty"), "");
    let fine = api("fine", "/fine/", &up.url(), "");
    cfg.write(
        "all.yaml",
        &[faulty.clone(), fine.clone(), api("d", "/d/", &up.url(), &mw("pre", "faulty", "PanicOnDrop"))].concat(),
    );
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    assert_eq!(gw.get("/d/x").await.status, StatusCode::OK);
    let v = gw.config().await["version"].as_u64().unwrap();

    // The API goes away: its hook instance is destroyed, and its Drop panics.
    cfg.write("all.yaml", &[faulty, fine].concat());
    gw.wait_version(v + 1).await;
    let line = gw.wait_for_log_containing("panicked while being dropped").await;
    assert!(line.contains("this hook state panics on purpose when dropped"), "{line}");
    assert!(line.contains("PanicsWhenDropped"), "names the hook type: {line}");
    assert_eq!(gw.get("/fine/x").await.status, StatusCode::OK, "the gateway is still serving");
    assert_eq!(gw.get("/d/x").await.status, StatusCode::NOT_FOUND);
}
