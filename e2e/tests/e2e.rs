//! Gatehouse end to end, against a real kube-apiserver with etcd (see e2e/cluster/README.md):
//! `cargo test -p gatehouse-e2e --test e2e`. Every module shares one cluster per test
//! process (`cluster::cluster()`); each test works in a namespace of its own.

#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/cluster.rs"]
mod cluster;
#[path = "e2e/controller.rs"]
mod controller;
#[path = "e2e/crds.rs"]
mod crds;
#[path = "e2e/procs.rs"]
mod procs;
#[path = "e2e/stream_tls.rs"]
mod stream_tls;
