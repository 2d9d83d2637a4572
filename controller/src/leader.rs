//! Leader election on a `coordination.k8s.io` Lease. Every replica serves config streams;
//! the holder of the Lease writes status. The holder's address is on the Lease, so that the
//! other replicas can forward the acks they receive.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;

/// A leader that stops renewing is replaced after this long (plus one renewal period).
pub const LEASE_SECONDS: i32 = 10;
const RENEW_EVERY: Duration = Duration::from_secs(2);
pub const ADDRESS_ANNOTATION: &str = "gatehouse.dev/ack-address";

/// Who leads: whether it is us, and the leader's ack address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    pub is_leader: bool,
    pub leader_address: Option<String>,
}

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    address: String,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, address: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            address: address.to_owned(),
        }
    }

    /// Campaigns and renews until the process ends, publishing every change of leadership.
    pub async fn run(self, tx: watch::Sender<Leadership>) {
        let mut last_renewed: Option<std::time::Instant> = None;
        loop {
            match self.step().await {
                Ok(l) => {
                    if l.is_leader {
                        last_renewed = Some(std::time::Instant::now());
                    }
                    tx.send_if_modified(|cur| {
                        let changed = *cur != l;
                        if changed {
                            tracing::info!(leader = l.is_leader, address = ?l.leader_address, "leadership changed");
                        }
                        *cur = l;
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Past our own lease, someone else may lead: stop writing status.
                    let expired = last_renewed.is_none_or(|t| t.elapsed() >= Duration::from_secs(LEASE_SECONDS as u64));
                    if expired {
                        tx.send_if_modified(|cur| std::mem::replace(&mut cur.is_leader, false));
                    }
                }
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    async fn step(&self) -> kube::Result<Leadership> {
        let now = jiff::Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = self.lease(ObjectMeta::default(), None, now, 0);
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(self.leading()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Leadership::default()),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS)) * 1000;
        let expired =
            spec.renew_time.as_ref().is_none_or(|t| now.as_millisecond() - t.0.as_millisecond() > duration_ms);
        let theirs_address = lease.metadata.annotations.as_ref().and_then(|a| a.get(ADDRESS_ANNOTATION)).cloned();
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(Leadership { is_leader: false, leader_address: theirs_address });
        }
        let taking_over = holder != self.identity;
        let acquired = if taking_over { Some(now) } else { spec.acquire_time.map(|t| t.0) };
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(taking_over);
        let updated = self.lease(lease.metadata.clone(), acquired, now, transitions);
        // The resourceVersion in the metadata makes this a compare-and-swap.
        match self.api.replace(&self.name, &PostParams::default(), &updated).await {
            Ok(_) => {
                if taking_over {
                    tracing::info!(previous = %holder, "took over the lease");
                }
                Ok(self.leading())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                Ok(Leadership { is_leader: false, leader_address: theirs_address })
            }
            Err(e) => Err(e),
        }
    }

    fn leading(&self) -> Leadership {
        Leadership { is_leader: true, leader_address: Some(self.address.clone()) }
    }

    fn lease(
        &self,
        mut meta: ObjectMeta,
        acquired: Option<jiff::Timestamp>,
        now: jiff::Timestamp,
        transitions: i32,
    ) -> Lease {
        meta.name = Some(self.name.clone());
        meta.annotations.get_or_insert_default().insert(ADDRESS_ANNOTATION.to_owned(), self.address.clone());
        Lease {
            metadata: meta,
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                acquire_time: Some(MicroTime(acquired.unwrap_or(now))),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Gives the lease up (on shutdown), so another replica takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let ours = lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.identity.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.renew_time = None;
        }
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &lease).await {
            tracing::warn!(error = %e, "releasing the lease");
        }
    }
}
