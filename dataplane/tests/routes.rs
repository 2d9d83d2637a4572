//! Who owns a route, where upstreams may point, and who may read /config: the standalone
//! gateway over real HTTP.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use http::StatusCode;

/// An ApiDefinition in a namespace of its own.
fn api_in(namespace: &str, name: &str, listen_path: &str, upstream: &str) -> String {
    format!(
        "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  listenPath: {listen_path}\n  upstream: {{url: \"{upstream}\"}}\n"
    )
}

fn find_api(config: &serde_json::Value, id: &str) -> serde_json::Value {
    config["apis"].as_array().unwrap().iter().find(|a| a["id"] == id).cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_that_serves_keeps_its_route_when_a_newer_one_claims_it() {
    let (old_up, new_up, other_up) =
        (Upstream::start("old").await, Upstream::start("new").await, Upstream::start("other").await);
    let cfg = ConfigDir::new();
    cfg.write("old.yaml", &api_in("team-b", "zz-shop", "/shop/", &old_up.url()));
    cfg.write("other.yaml", &api("other", "/other/", &other_up.url(), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let v = gw.config().await["version"].as_u64().unwrap();
    assert_eq!(gw.get("/shop/x").await.json()["upstream"], "old");

    // A newer API in another namespace, whose name sorts first, claims the same route.
    cfg.write("new.yaml", &api_in("team-a", "aa-shop", "/shop", &new_up.url()));
    let config = gw.wait_version(v + 1).await;
    let loser = api_state(&config, "team-a/aa-shop");
    assert_eq!(
        loser, "conflicted: spec.listenPath: /shop on any host is already served by team-b/zz-shop, which is older",
        "{config}"
    );
    assert_eq!(api_state(&config, "team-b/zz-shop"), "serving");
    assert_eq!(gw.get("/shop/x").await.json()["upstream"], "old");
    assert_eq!(gw.get("/other/x").await.json()["upstream"], "other");

    // Editing the older API does not make it new.
    cfg.write(
        "old.yaml",
        &format!("{}  stripListenPath: false\n", api_in("team-b", "zz-shop", "/shop/", &old_up.url())),
    );
    let config = gw.wait_version(v + 2).await;
    assert!(api_state(&config, "team-a/aa-shop").starts_with("conflicted: "), "{config}");
    assert_eq!(gw.get("/shop/x").await.json()["path"], "/shop/x", "the edit is served");
    assert_eq!(new_up.hits(), 0);

    // The older one goes: the newer one takes the route over.
    std::fs::remove_file(cfg.path().join("old.yaml")).unwrap();
    let config = gw.wait_version(v + 3).await;
    assert_eq!(api_state(&config, "team-a/aa-shop"), "serving", "{config}");
    assert_eq!(gw.get("/shop/x").await.json()["upstream"], "new");
    assert_eq!(gw.get("/other/x").await.json()["upstream"], "other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_creation_timestamp_decides_and_hosts_clash_all_or_nothing() {
    let (a_up, b_up) = (Upstream::start("a").await, Upstream::start("b").await);
    let cfg = ConfigDir::new();
    cfg.write("a.yaml", &format!("{}  hosts: [shop.example]\n", api_in("ns", "a", "/", &a_up.url())));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let v = gw.config().await["version"].as_u64().unwrap();

    // Added later, but created (as a manifest may say) long ago: it is the older one.
    let b = api_in("ns", "b", "/", &b_up.url()).replace(
        "metadata: {name: b, namespace: ns}",
        "metadata: {name: b, namespace: ns, creationTimestamp: \"2020-01-01T00:00:00Z\"}",
    );
    cfg.write("b.yaml", &format!("{b}  hosts: [other.example, SHOP.example]\n"));
    let config = gw.wait_version(v + 1).await;
    assert_eq!(api_state(&config, "ns/b"), "serving", "{config}");
    assert_eq!(
        api_state(&config, "ns/a"),
        "conflicted: spec.listenPath: / on host shop.example is already served by ns/b, which is older"
    );
    assert_eq!(gw.get_with("/x", &[("host", "shop.example")]).await.json()["upstream"], "b");
    assert_eq!(gw.get_with("/x", &[("host", "other.example")]).await.json()["upstream"], "b");
    assert_eq!(a_up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_local_and_own_listener_upstreams_are_refused_while_others_serve() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("good.yaml", &api("good", "/good/", &up.url(), ""));
    cfg.write("metadata.yaml", &api("metadata", "/metadata/", "http://169.254.169.254/", ""));
    cfg.write("mapped.yaml", &api("mapped", "/mapped/", "http://[::ffff:169.254.169.254]:80/", ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let v = gw.config().await["version"].as_u64().unwrap();
    cfg.write("loop.yaml", &api("loop", "/loop/", &format!("http://127.0.0.1:{}/", gw.addr.port()), ""));
    cfg.write("admin.yaml", &api("admin", "/admin/", &format!("http://127.0.0.1:{}/", gw.admin.port()), ""));
    let config = gw.wait_version(v + 1).await;

    assert_eq!(
        api_state(&config, "default/metadata"),
        "spec.upstream: \"http://169.254.169.254/\": 169.254.169.254 is link-local (cloud metadata services answer there); refused unless --allow-upstream link-local",
        "{config}"
    );
    assert!(api_state(&config, "default/mapped").contains("169.254.169.254 is link-local"), "{config}");
    let own = api_state(&config, "default/loop");
    assert!(own.starts_with("spec.upstream: ") && own.contains("is this gateway's own listener"), "{own}");
    assert!(own.ends_with("refused unless --allow-upstream self"), "{own}");
    assert!(api_state(&config, "default/admin").contains("own listener"), "{config}");
    for refused in ["/metadata/x", "/mapped/x", "/loop/x", "/admin/healthz"] {
        let r = gw.get(refused).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{refused}: not served");
    }
    assert_eq!(gw.get("/good/x").await.json()["upstream"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_upstream_accepts_link_local_and_own_listeners() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("good.yaml", &api("good", "/good/", &up.url(), ""));
    cfg.write("metadata.yaml", &api("metadata", "/metadata/", "http://169.254.169.254/", ""));
    let gw = Gatehouse::start(cfg.path(), &["--allow-upstream", "link-local,self"]).await;
    let v = gw.config().await["version"].as_u64().unwrap();
    cfg.write("admin.yaml", &api("admin", "/admin/", &format!("http://127.0.0.1:{}/", gw.admin.port()), ""));
    let config = gw.wait_version(v + 1).await;
    assert_eq!(api_state(&config, "default/metadata"), "serving", "{config}");
    assert_eq!(api_state(&config, "default/admin"), "serving", "{config}");
    // Through the gateway into its own admin port.
    let r = gw.get("/admin/healthz").await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, r#"{"status":"ok"}"#.to_owned()));
    assert_eq!(gw.get("/good/x").await.json()["upstream"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_names_resolving_to_refused_addresses_get_502_at_connect_time() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("good.yaml", &api("good", "/good/", &up.url(), ""));
    // Names are served (only their addresses can tell), and refused when they resolve.
    cfg.write("numeric.yaml", &api("numeric", "/numeric/", "http://2852039166/", ""));
    // A name for a loopback upstream on another port is fine.
    cfg.write("named.yaml", &api("named", "/named/", &format!("http://localhost:{}/", up.addr.port()), ""));
    let gw = Gatehouse::start(cfg.path(), &[]).await;
    let v = gw.config().await["version"].as_u64().unwrap();
    // /etc/hosts maps localhost to loopback, where this gateway listens.
    cfg.write("self.yaml", &api("self", "/self/", &format!("http://localhost:{}/", gw.addr.port()), ""));
    let config = gw.wait_version(v + 1).await;
    assert_eq!(api_state(&config, "default/self"), "serving", "{config}");

    let r = gw.get("/self/x").await;
    assert_eq!((r.status, r.error()), (StatusCode::BAD_GATEWAY, "upstream unreachable".to_owned()));
    gw.wait_until("the refusal to be logged", async || {
        gw.logs()
            .lines()
            .any(|l| l.contains("upstream refused") && l.contains("default/self") && l.contains("own listener"))
    })
    .await;

    // 2852039166 is 169.254.169.254 to getaddrinfo.
    let r = gw.get("/numeric/x").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    gw.wait_until("the resolver's refusal to be logged", async || {
        gw.logs().lines().any(|l| {
            l.contains("upstream refused")
                && l.contains("default/numeric")
                && l.contains("2852039166 resolves only to refused addresses: 169.254.169.254 is link-local")
        })
    })
    .await;

    assert_eq!(gw.get("/named/x").await.json()["upstream"], "up");
    assert_eq!(gw.get("/good/x").await.json()["upstream"], "up");
}

/// An address of this host that is not loopback, to reach a wildcard-bound port as a
/// remote client would.
fn non_loopback_address() -> IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    // No packet is sent: connecting a UDP socket only picks the route and source address.
    s.connect("192.0.2.123:9").or_else(|_| s.connect("10.255.255.1:9")).unwrap();
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "this test needs a non-loopback address; got {ip}");
    ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_answers_loopback_clients_only_unless_exposed() {
    let up = Upstream::start("up").await;
    let cfg = ConfigDir::new();
    cfg.write("good.yaml", &api("good", "/good/", &up.url(), ""));
    let remote = non_loopback_address();

    let gw = Gatehouse::start_at(cfg.path(), "127.0.0.1:0", "0.0.0.0:0", &[]).await;
    let outside = SocketAddr::new(remote, gw.admin.port());
    let r = gw.admin_at(outside, "/config").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert!(r.error().contains("loopback clients only") && r.error().contains("--expose-config"), "{}", r.text());
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(gw.admin_at(outside, open).await.status, StatusCode::OK, "{open} answers everyone");
    }
    let local = gw.config().await;
    assert_eq!(find_api(&local, "default/good")["state"], "serving", "loopback clients still read it: {local}");
    assert_eq!(gw.get("/good/x").await.json()["upstream"], "up");
    drop(gw);

    let gw = Gatehouse::start_at(cfg.path(), "127.0.0.1:0", "0.0.0.0:0", &["--expose-config"]).await;
    let r = gw.admin_at(SocketAddr::new(remote, gw.admin.port()), "/config").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(find_api(&r.json(), "default/good")["state"], "serving");
}
