//! The controller against the real API server, with dataplanes as local processes: config
//! reaches every dataplane, status says so, and outages of either side are survived.

use std::{
    io::Write,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use gatehouse_crds::{ApiDefinition, Plugin};
use http::StatusCode;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};

use crate::{
    cluster::{Cluster, cluster, fresh_namespace, install_crds},
    procs::{Proc, controller, controller_of, dataplane, eventually, get, send, upstream},
};

struct Env {
    c: Cluster,
    ns: String,
    dir: tempfile::TempDir,
    token: PathBuf,
}

/// A namespace with the CRDs, a `dataplane` ServiceAccount, and a token for it with the
/// audience the controller checks.
async fn env(prefix: &str) -> Env {
    let c = cluster().await;
    install_crds(&c.client).await;
    let ns = fresh_namespace(&c.client, prefix).await;
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta { name: Some("dataplane".into()), ..Default::default() },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(c.client.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap_or_else(|e| panic!("creating the ServiceAccount: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let token = dir.path().join("token");
    let out = kubectl(&c, &ns, &["create", "token", "dataplane", "--audience", "gatehouse", "--duration", "1h"], None);
    std::fs::write(&token, out).unwrap_or_else(|e| panic!("writing the token: {e}"));
    Env { c, ns, dir, token }
}

/// `kubectl -n ns args…` (stdin given), its stdout; panics when it fails.
pub fn kubectl(c: &Cluster, ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = std::process::Command::new(&c.kubectl)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("kubectl stdin: {e}"));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("kubectl: {e}"));
    assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn apply(e: &Env, yaml: &str) {
    kubectl(&e.c, &e.ns, &["apply", "-f", "-"], Some(yaml));
}

fn api_yaml(name: &str, path: &str, upstream: &str, extra: &str) -> String {
    format!(
        "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: {path}\n  upstream: {{url: \"http://{upstream}\"}}\n{extra}"
    )
}

async fn condition<K>(e: &Env, name: &str, ty: &str) -> Result<(String, String, String, i64), String>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    crate::procs::condition::<K>(&e.c.client, &e.ns, name, ty).await
}

/// The controller's reason for an API with `spec.tls` when its stream is plaintext.
fn gatehouse_controller_tls_not_streamed() -> &'static str {
    "spec.tls: certificates reach dataplanes only over a TLS config stream, and this controller's is plaintext (start it with --tls-cert-file and --tls-key-file)"
}

async fn serves(dp: &Proc, path: &str, want: &str) -> Result<(), String> {
    match get(&format!("http://{}{path}", dp.addr), &[]).await {
        Ok((StatusCode::OK, body)) if body == want => Ok(()),
        other => Err(format!("{path} on {}: {other:?}", dp.addr)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_update_and_delete_reach_both_dataplanes_and_status_counts_them() {
    let e = env("flow").await;
    let up = upstream("a").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let dp1 = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp1"), "dp-1");
    let dp2 = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp2"), "dp-2");

    apply(&e, &api_yaml("web", "/web/", &up.to_string(), ""));
    for dp in [&dp1, &dp2] {
        let took = eventually("the API to be served", || serves(dp, "/web/x", "upstream a /x")).await;
        eprintln!("apply → served on {}: {took:?}", dp.addr);
    }
    eventually("Programmed 2/2 at generation 1", || async {
        match condition::<ApiDefinition>(&e, "web", "Programmed").await? {
            (s, r, m, 1) if s == "True" && r == "Programmed" && m == "2/2 dataplanes serve generation 1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(condition::<ApiDefinition>(&e, "web", "Accepted").await.map(|c| c.0), Ok("True".into()));

    // Update: served on both, observedGeneration follows.
    apply(&e, &api_yaml("web", "/web/", &format!("{up}/v2"), ""));
    for dp in [&dp1, &dp2] {
        let took = eventually("the update to be served", || serves(dp, "/web/x", "upstream a /v2/x")).await;
        eprintln!("update → served on {}: {took:?}", dp.addr);
    }
    eventually("observedGeneration 2", || async {
        match condition::<ApiDefinition>(&e, "web", "Programmed").await? {
            (s, _, m, 2) if s == "True" && m == "2/2 dataplanes serve generation 2" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Delete: gone from both.
    kubectl(&e.c, &e.ns, &["delete", "apidef", "web"], None);
    for dp in [&dp1, &dp2] {
        eventually("the API to be gone", || async {
            match get(&format!("http://{}/web/x", dp.addr), &[]).await {
                Ok((StatusCode::NOT_FOUND, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    assert!(ctl.metric("gatehouse_controller_dataplanes").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_load_makes_programmed_false_with_the_reason_while_others_serve() {
    let e = env("plugin").await;
    let up = upstream("b").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let dp = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp"), "dp-1");
    let plugin = "apiVersion: gatehouse.dev/v1alpha1\nkind: Plugin\nmetadata: {name: gone}\nspec: {path: /nonexistent/libgone.so}\n";
    apply(&e, plugin);
    apply(
        &e,
        &api_yaml("broken", "/broken/", &up.to_string(), "  middleware:\n    pre: [{plugin: gone, symbol: Hook}]\n"),
    );
    apply(&e, &api_yaml("fine", "/fine/", &up.to_string(), ""));

    eventually("the fine API to be served", || serves(&dp, "/fine/x", "upstream b /x")).await;
    eventually("Programmed=False with the plugin's reason", || async {
        match condition::<ApiDefinition>(&e, "broken", "Programmed").await? {
            (s, r, m, _)
                if s == "False"
                    && r == "Failed"
                    && m.contains("dp-1: answering 500")
                    && m.contains("cannot read the file") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the Plugin's Loaded=False", || async {
        match condition::<Plugin>(&e, "gone", "Loaded").await? {
            (s, _, m, _) if s == "False" && m.contains("cannot read the file") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let r = get(&format!("http://{}/broken/x", dp.addr), &[]).await;
    assert_eq!(r.map(|r| r.0), Ok(StatusCode::INTERNAL_SERVER_ERROR));
    eventually("the fine API Programmed", || async {
        match condition::<ApiDefinition>(&e, "fine", "Programmed").await? {
            (s, ..) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_with_tls_is_not_programmed_and_says_why_while_its_plain_routes_and_others_serve() {
    let e = env("tls").await;
    let up = upstream("t").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let dp = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp"), "dp-1");
    apply(
        &e,
        &api_yaml(
            "secure",
            "/secure/",
            &up.to_string(),
            "  hosts: [secure.example]\n  tls: {secretName: secure-cert}\n",
        ),
    );
    apply(&e, &api_yaml("fine", "/fine/", &up.to_string(), ""));
    eventually("the fine API to be served", || serves(&dp, "/fine/x", "upstream t /x")).await;
    eventually("Programmed=False, Unsupported, with the reason", || async {
        match condition::<ApiDefinition>(&e, "secure", "Programmed").await? {
            (s, r, m, _) if s == "False" && r == "Unsupported" && m == gatehouse_controller_tls_not_streamed() => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("its plain-HTTP route to be served", || async {
        match get(&format!("http://{}/secure/x", dp.addr), &[("host", "secure.example")]).await {
            Ok((StatusCode::OK, body)) if body == "upstream t /x" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the fine API Programmed", || async {
        match condition::<ApiDefinition>(&e, "fine", "Programmed").await? {
            (s, ..) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_secret_grants_access_until_it_is_revoked() {
    let e = env("keys").await;
    let up = upstream("c").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let dp = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp"), "dp-1");
    apply(&e, &api_yaml("orders", "/orders/", &up.to_string(), "  auth: {type: authToken}\n"));
    let key = "apiVersion: v1\nkind: Secret\nmetadata: {name: alice, labels: {gatehouse.dev/key: \"true\"}}\nstringData:\n  key: alice-key\n  session.yaml: |\n    accessRights: [orders]\n";
    apply(&e, key);
    let with_key = || async {
        match get(&format!("http://{}/orders/x", dp.addr), &[("authorization", "alice-key")]).await {
            Ok((s, _)) => Ok(s),
            Err(err) => Err(err),
        }
    };
    eventually("the key to work", || async {
        if with_key().await? == StatusCode::OK { Ok(()) } else { Err("not yet".into()) }
    })
    .await;
    Api::<Secret>::namespaced(e.c.client.clone(), &e.ns)
        .delete("alice", &DeleteParams::default())
        .await
        .unwrap_or_else(|err| panic!("deleting the key: {err}"));
    eventually("the key to be revoked", || async {
        if with_key().await? == StatusCode::UNAUTHORIZED { Ok(()) } else { Err("still accepted".into()) }
    })
    .await;
    let r = get(&format!("http://{}/orders/x", dp.addr), &[]).await;
    assert_eq!(r.map(|r| r.0), Ok(StatusCode::UNAUTHORIZED));
    assert!(!dp.logs().contains("alice-key"), "raw keys never reach the dataplane");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_upstreams_compile_into_the_ready_endpoints_of_their_slices() {
    let e = env("svc").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let dp = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp"), "dp-1");
    apply(
        &e,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    );
    let slice = |addrs: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{addrs}"
        )
    };
    apply(
        &e,
        &slice(
            "- {addresses: [10.1.2.3], conditions: {ready: true}}\n- {addresses: [10.1.2.9], conditions: {ready: false}}\n",
        ),
    );
    apply(
        &e,
        "apiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {name: web}\nspec:\n  listenPath: /web/\n  upstream: {service: {name: web, port: 80}}\n",
    );
    let targets = |want: &'static [&'static str]| {
        let url = format!("http://{}/config", dp.admin);
        async move {
            let (_, body) = get(&url, &[]).await?;
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|err| err.to_string())?;
            let got: Vec<String> = v["apis"][0]["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
            if got == want { Ok(()) } else { Err(format!("targets {got:?}")) }
        }
    };
    eventually("targets from the ready endpoint", || targets(&["http://10.1.2.3:8080"])).await;
    apply(&e, &slice("- {addresses: [10.1.2.3]}\n- {addresses: [10.1.2.4]}\n"));
    eventually("targets to follow the slice", || targets(&["http://10.1.2.3:8080", "http://10.1.2.4:8080"])).await;
    eventually("ResolvedRefs", || async {
        match condition::<ApiDefinition>(&e, "web", "ResolvedRefs").await? {
            (s, ..) if s == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_controller_down_dataplanes_keep_serving_and_restart_from_disk() {
    let e = env("outage").await;
    let up = upstream("d").await;
    let mut ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    let state = e.dir.path().join("dp");
    let mut dp = dataplane(ctl.addr, &e.token, &state, "dp-1");
    apply(&e, &api_yaml("web", "/web/", &up.to_string(), ""));
    eventually("the API to be served", || serves(&dp, "/web/x", "upstream d /x")).await;

    let addr = ctl.addr;
    ctl.kill();
    serves(&dp, "/web/x", "upstream d /x").await.unwrap_or_else(|err| panic!("after the controller died: {err}"));
    // Let a save finish, then restart the dataplane while the controller is still down.
    eventually("the snapshot on disk", || async {
        if state.join("state/snapshot.json").exists() { Ok(()) } else { Err("not saved".into()) }
    })
    .await;
    dp.kill();
    let dp = dataplane(addr, &e.token, &state, "dp-1");
    eventually("serving from disk", || serves(&dp, "/web/x", "upstream d /x")).await;
    let ready = get(&format!("http://{}/readyz", dp.admin), &[]).await;
    assert_eq!(ready.map(|r| r.0), Ok(StatusCode::OK));
    eventually("the restart from disk in the log", || async {
        if dp.logs().contains("serving the config saved on disk") { Ok(()) } else { Err(dp.logs()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_token_get_nothing() {
    let e = env("authn").await;
    let up = upstream("e").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    apply(&e, &api_yaml("web", "/web/", &up.to_string(), ""));
    let stream = format!("http://{}/v1/stream", ctl.addr);
    let r = get(&stream, &[]).await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{}", r.1);
    let r = get(&stream, &[("authorization", "Bearer not-a-token")]).await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{}", r.1);
    // A real token of another ServiceAccount, and one for another audience.
    let other = Api::<ServiceAccount>::namespaced(e.c.client.clone(), &e.ns);
    let sa = ServiceAccount {
        metadata: kube::api::ObjectMeta { name: Some("intruder".into()), ..Default::default() },
        ..Default::default()
    };
    other.create(&PostParams::default(), &sa).await.unwrap_or_else(|err| panic!("{err}"));
    let intruder = kubectl(&e.c, &e.ns, &["create", "token", "intruder", "--audience", "gatehouse"], None);
    let r = get(&stream, &[("authorization", &format!("Bearer {}", intruder.trim()))])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(r.0, StatusCode::FORBIDDEN, "{}", r.1);
    assert!(r.1.contains(&format!("system:serviceaccount:{}:intruder may not receive config", e.ns)), "{}", r.1);
    let wrong_audience = kubectl(&e.c, &e.ns, &["create", "token", "dataplane", "--audience", "something-else"], None);
    let r = get(&stream, &[("authorization", &format!("Bearer {}", wrong_audience.trim()))])
        .await
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{}", r.1);

    // A dataplane with a bad token serves nothing and never becomes ready.
    let bad = e.dir.path().join("bad-token");
    std::fs::write(&bad, "not-a-token").unwrap_or_else(|err| panic!("{err}"));
    let dp = dataplane(ctl.addr, &bad, &e.dir.path().join("dp"), "dp-bad");
    eventually("the refusal in the dataplane's log", || async {
        if dp.logs().contains("controller refused the stream: 401") { Ok(()) } else { Err("not yet".into()) }
    })
    .await;
    let ready = get(&format!("http://{}/readyz", dp.admin), &[]).await;
    assert_eq!(ready.map(|r| r.0), Ok(StatusCode::SERVICE_UNAVAILABLE));
    assert!(ctl.metric("gatehouse_controller_refused_clients_total").await >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_token_acks_only_for_its_pod_and_made_up_tokens_cost_few_reviews() {
    let e = env("ackid").await;
    let ctl = controller(&e.c.kubeconfig, &e.ns, "ctl-1");
    // The Pod a projected token would be bound to (no kubelet runs it here).
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: dp-pod-1}\nspec:\n  serviceAccountName: dataplane\n  containers: [{name: dataplane, image: gatehouse-dataplane}]\n";
    apply(&e, pod);
    let uid = kubectl(&e.c, &e.ns, &["get", "pod", "dp-pod-1", "-o", "jsonpath={.metadata.uid}"], None);
    let bound = ["--bound-object-kind", "Pod", "--bound-object-name", "dp-pod-1", "--bound-object-uid", uid.trim()];
    let token = kubectl(
        &e.c,
        &e.ns,
        &[&["create", "token", "dataplane", "--audience", "gatehouse"][..], &bound].concat(),
        None,
    );
    let auth = format!("Bearer {}", token.trim());
    let ack_url = format!("http://{}/v1/ack", ctl.addr);
    let ack = |node: &str| format!(r#"{{"node":"{node}","version":1,"apis":{{}},"plugins":{{}}}}"#);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let (status, _, body) =
        send(http::Method::POST, &ack_url, &headers, &ack("dp-pod-2")).await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("an ack for node dp-pod-2 refused: the token is pod dp-pod-1's"), "{body}");
    let (status, _, body) =
        send(http::Method::POST, &ack_url, &headers, &ack("dp-pod-1")).await.unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    eventually("the refusal in the controller's log", || async {
        if ctl.logs().contains("an ack for node dp-pod-2 refused") { Ok(()) } else { Err("not yet".into()) }
    })
    .await;

    // One made-up token, replayed: one review, then its cached refusal.
    let stream = format!("http://{}/v1/stream", ctl.addr);
    let before = ctl.metric("gatehouse_controller_token_reviews_total").await;
    let fake = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWRlLXVwIn0.c2lnbmF0dXJl";
    for _ in 0..30 {
        let r = get(&stream, &[("authorization", fake)]).await.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{}", r.1);
    }
    assert_eq!(ctl.metric("gatehouse_controller_token_reviews_total").await - before, 1.0);
    // Malformed ones are never reviewed.
    for bad in ["Bearer not-a-token", "Bearer a.b", "Basic dXNlcjpwYXNz"] {
        let r = get(&stream, &[("authorization", bad)]).await.unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(r.0, StatusCode::UNAUTHORIZED, "{bad}: {}", r.1);
    }
    assert_eq!(ctl.metric("gatehouse_controller_token_reviews_total").await - before, 1.0);

    // A flood of distinct made-up tokens: the reviews are capped by the rate limit (20 a
    // second, a burst of 20), the rest refused with 429 before the API server hears of them.
    let started = std::time::Instant::now();
    let before = ctl.metric("gatehouse_controller_token_reviews_total").await;
    let mut throttled = 0u32;
    for i in 0..200 {
        let token = format!("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ{i}In0.c2lnbmF0dXJl");
        let (status, body) = get(&stream, &[("authorization", &token)]).await.unwrap_or_else(|err| panic!("{err}"));
        match status {
            StatusCode::TOO_MANY_REQUESTS => throttled += 1,
            StatusCode::UNAUTHORIZED => {}
            other => panic!("{other}: {body}"),
        }
    }
    let reviewed = ctl.metric("gatehouse_controller_token_reviews_total").await - before;
    let allowed = 20.0 + 20.0 * started.elapsed().as_secs_f64().ceil();
    assert!(reviewed <= allowed, "{reviewed} reviews in {:?}", started.elapsed());
    assert_eq!(f64::from(throttled), 200.0 - reviewed, "every token not reviewed was answered 429");
    // The real dataplane token still works: its verdict is cached, or the limiter refills.
    eventually("the bound token to be accepted again", || async {
        match send(http::Method::POST, &ack_url, &headers, &ack("dp-pod-1")).await {
            Ok((StatusCode::NO_CONTENT, ..)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_elect_one_leader_and_the_other_takes_over_when_it_dies() {
    let e = env("leader").await;
    let up = upstream("f").await;
    let a = controller(&e.c.kubeconfig, &e.ns, "ctl-a");
    let b = controller(&e.c.kubeconfig, &e.ns, "ctl-b");
    eventually("one leader", || async {
        let leaders = a.metric("gatehouse_controller_leader").await + b.metric("gatehouse_controller_leader").await;
        if leaders == 1.0 { Ok(()) } else { Err(format!("{leaders} leaders")) }
    })
    .await;
    let (mut leader, follower) = if a.metric("gatehouse_controller_leader").await == 1.0 { (a, b) } else { (b, a) };
    // The dataplane talks to the follower, which forwards its acks to the leader.
    let dp = dataplane(follower.addr, &e.token, &e.dir.path().join("dp"), "dp-1");
    apply(&e, &api_yaml("web", "/web/", &up.to_string(), ""));
    eventually("the API to be served", || serves(&dp, "/web/x", "upstream f /x")).await;
    eventually("Programmed by the leader from forwarded acks", || async {
        match condition::<ApiDefinition>(&e, "web", "Programmed").await? {
            (s, _, m, 1) if s == "True" && m == "1/1 dataplanes serve generation 1" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    leader.kill();
    let took = eventually("the follower to take over", || async {
        if follower.metric("gatehouse_controller_leader").await == 1.0 { Ok(()) } else { Err("not leading".into()) }
    })
    .await;
    eprintln!("failover took {took:?}");
    assert!(took.as_secs() < 15, "failover within 15 s (lease 10 s + renewal 2 s), took {took:?}");
    // The new leader writes status: a change is counted again.
    apply(&e, &api_yaml("web", "/web/", &format!("{up}/v2"), ""));
    eventually("observedGeneration 2 written by the new leader", || async {
        match condition::<ApiDefinition>(&e, "web", "Programmed").await? {
            (s, _, m, 2) if s == "True" && m == "1/1 dataplanes serve generation 2" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// Requests `path` through `dp` until told to stop; returns how many were sent and every
/// answer that was not `want`.
fn keep_requesting(
    dp: &Proc,
    path: &str,
    want: &str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(usize, Vec<String>)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (url, want, s) = (format!("http://{}{path}", dp.addr), want.to_owned(), stop.clone());
    let task = tokio::spawn(async move {
        let (mut sent, mut wrong) = (0, Vec::new());
        while !s.load(Ordering::Relaxed) {
            sent += 1;
            match get(&url, &[]).await {
                Ok((StatusCode::OK, body)) if body == want => {}
                other => wrong.push(format!("{other:?}")),
            }
        }
        (sent, wrong)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_api_keeps_its_route_while_a_newer_one_in_another_namespace_claims_it() {
    // The newer API's namespace and name sort first: only its age can make it lose.
    let e = env("zz-owner").await;
    let newer_ns = fresh_namespace(&e.c.client, "aa-owner").await;
    let (old_up, new_up) = (upstream("old").await, upstream("new").await);
    let ctl = controller_of(&e.c.kubeconfig, &[&e.ns, &newer_ns], "ctl-1");
    let dp = dataplane(ctl.addr, &e.token, &e.dir.path().join("dp"), "dp-1");

    apply(&e, &api_yaml("zz-shop", "/shop/", &old_up.to_string(), ""));
    eventually("the older API to be served", || serves(&dp, "/shop/x", "upstream old /x")).await;
    // creationTimestamp counts whole seconds: let one pass, so the newer one is newer.
    let created = Api::<ApiDefinition>::namespaced(e.c.client.clone(), &e.ns)
        .get("zz-shop")
        .await
        .unwrap_or_else(|err| panic!("{err}"))
        .metadata
        .creation_timestamp
        .unwrap_or_else(|| panic!("no creationTimestamp"))
        .0;
    eventually("the next second", || async {
        let elapsed = jiff::Timestamp::now().duration_since(created);
        if elapsed >= jiff::SignedDuration::from_secs(1) { Ok(()) } else { Err(format!("{elapsed:?}")) }
    })
    .await;
    let (stop, requests) = keep_requesting(&dp, "/shop/x", "upstream old /x");

    kubectl(&e.c, &newer_ns, &["apply", "-f", "-"], Some(&api_yaml("aa-shop", "/shop", &new_up.to_string(), "")));
    let winner = format!("{}/zz-shop", e.ns);
    eventually("Accepted=False/Conflicted naming the winner and the route", || async {
        match crate::procs::condition::<ApiDefinition>(&e.c.client, &newer_ns, "aa-shop", "Accepted").await? {
            (s, r, m, _)
                if s == "False"
                    && r == "Conflicted"
                    && m == format!("spec.listenPath: /shop on any host is already served by {winner}, which is older; this API is not served") =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let loser = format!("{newer_ns}/aa-shop");
    eventually("the dataplane to report the loser", || async {
        let (_, body) = get(&format!("http://{}/config", dp.admin), &[]).await?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|err| err.to_string())?;
        let state =
            v["apis"].as_array().into_iter().flatten().find(|a| a["id"] == loser.as_str()).map(|a| a["state"].clone());
        match state.as_ref().and_then(|s| s.as_str()) {
            Some(s) if s.starts_with("conflicted: ") && s.contains(&winner) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    for ty in ["Accepted", "Programmed"] {
        let c = condition::<ApiDefinition>(&e, "zz-shop", ty).await;
        assert_eq!(c.as_ref().map(|c| c.0.as_str()), Ok("True"), "the winner's {ty}: {c:?}");
    }

    kubectl(&e.c, &newer_ns, &["delete", "apidef", "aa-shop"], None);
    eventually("the newer API to be gone from the dataplane", || async {
        let (_, body) = get(&format!("http://{}/config", dp.admin), &[]).await?;
        if body.contains(&loser) { Err("still there".into()) } else { Ok(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let (sent, wrong) = requests.await.unwrap_or_else(|err| panic!("{err}"));
    assert!(
        sent > 0 && wrong.is_empty(),
        "{} of {sent} requests were not served by the older API: {wrong:?}",
        wrong.len()
    );
    serves(&dp, "/shop/x", "upstream old /x").await.unwrap_or_else(|err| panic!("{err}"));
}
