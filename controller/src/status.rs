//! Status, written by the leader only: Accepted and ResolvedRefs from compiling, Programmed
//! from what the dataplanes acknowledge ("n/m dataplanes serve generation g"), with
//! observedGeneration, by server-side apply. A write happens only when something changed.

use std::{collections::HashMap, sync::Arc, time::Duration};

use gatehouse_crds::{ApiDefinition, Plugin, protocol::Ack, routes::Conflict};
use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::watch;

use crate::{
    acks::{Acks, Tally, tally},
    compile::Outcome,
    leader::Leadership,
    metrics::Metrics,
    watch::{State, lock},
};

const FIELD_MANAGER: &str = "gatehouse-controller";
const EVERY: Duration = Duration::from_millis(250);

/// The conditions one resource should have; times are filled in when written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    generation: i64,
    conditions: Vec<(&'static str, bool, &'static str, String)>,
}

pub struct StatusWriter {
    client: Client,
    state: State,
    acks: Arc<Acks>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// What was last written per `kind/id`, with each condition's transition time.
    written: HashMap<String, (Wanted, Transitions)>,
}

/// Per condition type: its status and since when.
type Transitions = HashMap<&'static str, (bool, Time)>;

impl StatusWriter {
    pub fn new(client: Client, state: State, acks: Arc<Acks>, metrics: Arc<Metrics>, identity: &str) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.to_owned(), instance: Some(identity.to_owned()) };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            state,
            acks,
            metrics,
            written: HashMap::new(),
        }
    }

    pub async fn run(mut self, mut leadership: watch::Receiver<Leadership>) {
        loop {
            let live = self.acks.live();
            self.metrics.dataplanes.set(live.len() as i64);
            let leading = leadership.borrow_and_update().is_leader;
            self.metrics.leader.set(i64::from(leading));
            if leading {
                self.write_all(&live).await;
            } else {
                // A new leader writes everything afresh.
                self.written.clear();
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = leadership.changed() => {}
            }
        }
    }

    async fn write_all(&mut self, live: &[Ack]) {
        let (apis, plugins) = {
            let shared = lock(&self.state);
            let apis: Vec<(String, Outcome, Option<Conflict>)> = shared
                .api_outcomes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone(), shared.conflicts.get(k).cloned()))
                .collect();
            let plugins: Vec<(String, Outcome)> =
                shared.plugin_outcomes.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            (apis, plugins)
        };
        for (id, outcome, conflict) in apis {
            let t = tally(live, outcome.generation, |a| a.apis.get(&id));
            let wanted = api_conditions(&outcome, conflict.as_ref(), &t);
            self.write::<ApiDefinition>(&id, wanted).await;
        }
        for (id, outcome) in plugins {
            let t = tally(live, outcome.generation, |a| a.plugins.get(&id));
            let wanted = plugin_conditions(&outcome, &t);
            self.write::<Plugin>(&id, wanted).await;
        }
        let known: std::collections::HashSet<String> = {
            let shared = lock(&self.state);
            shared
                .api_outcomes
                .keys()
                .map(|k| format!("ApiDefinition/{k}"))
                .chain(shared.plugin_outcomes.keys().map(|k| format!("Plugin/{k}")))
                .collect()
        };
        self.written.retain(|k, _| known.contains(k));
    }

    async fn write<K>(&mut self, id: &str, wanted: Wanted)
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let kind = K::kind(&());
        let key = format!("{kind}/{id}");
        let prev = self.written.get(&key);
        if prev.is_some_and(|(w, _)| *w == wanted) {
            return;
        }
        let Some((ns, name)) = id.split_once('/') else { return };
        let now = Time(jiff::Timestamp::now());
        let mut times = prev.map(|(_, t)| t.clone()).unwrap_or_default();
        let mut became_false = Vec::new();
        let conditions: Vec<Condition> = wanted
            .conditions
            .iter()
            .map(|(ty, ok, reason, message)| {
                let since = match times.get(ty) {
                    Some((was, at)) if was == ok => at.clone(),
                    _ => {
                        if !ok {
                            became_false.push((*reason, message.clone()));
                        }
                        now.clone()
                    }
                };
                times.insert(ty, (*ok, since.clone()));
                Condition {
                    type_: (*ty).to_owned(),
                    status: if *ok { "True" } else { "False" }.to_owned(),
                    reason: (*reason).to_owned(),
                    message: message.clone(),
                    observed_generation: Some(wanted.generation),
                    last_transition_time: since,
                }
            })
            .collect();
        let patch = json!({
            "apiVersion": K::api_version(&()),
            "kind": kind,
            "status": {"observedGeneration": wanted.generation, "conditions": conditions},
        });
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        match api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
            Ok(_) => {
                self.metrics.status_writes.with_label_values(&["ok"]).inc();
                for (reason, note) in became_false {
                    self.event::<K>(ns, name, reason, note).await;
                }
                self.written.insert(key, (wanted, times));
            }
            // Deleted meanwhile: nothing to write.
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                self.metrics.status_writes.with_label_values(&["error"]).inc();
                tracing::warn!(resource = %key, error = %e, "writing status");
            }
        }
    }

    async fn event<K: Resource<DynamicType = ()>>(&self, ns: &str, name: &str, reason: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            namespace: Some(ns.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &reference).await {
            tracing::debug!(error = %e, "publishing event");
        }
    }
}

fn accepted_and_resolved(o: &Outcome) -> Vec<(&'static str, bool, &'static str, String)> {
    vec![
        match &o.accepted {
            Ok(()) => ("Accepted", true, "Accepted", "the spec is valid".to_owned()),
            Err(e) => ("Accepted", false, "Invalid", format!("{e}; the last accepted generation keeps serving")),
        },
        match &o.resolved {
            Ok(()) => ("ResolvedRefs", true, "ResolvedRefs", "every reference resolved".to_owned()),
            Err(e) => ("ResolvedRefs", false, "RefNotFound", e.clone()),
        },
    ]
}

fn programmed(t: &Tally, generation: i64, verb: &str) -> (bool, &'static str, String) {
    let counted = format!("{}/{} dataplanes {verb} generation {generation}", t.serving, t.live);
    if t.live == 0 {
        (false, "NoDataplanes", "no dataplane is connected".to_owned())
    } else if t.serving == t.live {
        (true, "Programmed", counted)
    } else if t.problems.iter().any(|p| !p.ends_with("not received yet") && !p.contains(": at generation")) {
        (false, "Failed", format!("{counted}; {}", t.problems.join("; ")))
    } else {
        (false, "Pending", format!("{counted}; {}", t.problems.join("; ")))
    }
}

fn api_conditions(o: &Outcome, conflict: Option<&Conflict>, t: &Tally) -> Wanted {
    let mut conditions = accepted_and_resolved(o);
    // An invalid spec says so first; a valid one that lost its route says to whom.
    if let (Ok(()), Some(c)) = (&o.accepted, conflict) {
        conditions[0] = ("Accepted", false, "Conflicted", format!("spec.listenPath: {c}; this API is not served"));
    }
    let (ok, reason, message) = match &o.unprogrammable {
        Some(why) => (false, "Unsupported", why.clone()),
        None => programmed(t, o.generation, "serve"),
    };
    conditions.push(("Programmed", ok, reason, message));
    Wanted { generation: o.generation, conditions }
}

fn plugin_conditions(o: &Outcome, t: &Tally) -> Wanted {
    let mut conditions = accepted_and_resolved(o);
    conditions.truncate(1);
    let (ok, reason, message) = programmed(t, o.generation, "loaded");
    conditions.push(("Loaded", ok, if ok { "Loaded" } else { reason }, message));
    Wanted { generation: o.generation, conditions }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome() -> Outcome {
        Outcome { generation: 3, accepted: Ok(()), resolved: Ok(()), unprogrammable: None }
    }

    #[test]
    fn programmed_says_how_many_dataplanes_serve_the_generation() {
        let t = Tally { serving: 2, live: 2, problems: vec![] };
        let w = api_conditions(&outcome(), None, &t);
        assert_eq!(w.conditions[2], ("Programmed", true, "Programmed", "2/2 dataplanes serve generation 3".to_owned()));
    }

    #[test]
    fn a_failing_dataplane_makes_programmed_false_with_its_reason() {
        let t = Tally { serving: 1, live: 2, problems: vec!["dp-2: answering 500: plugin x".into()] };
        let w = api_conditions(&outcome(), None, &t);
        let (_, ok, reason, message) = &w.conditions[2];
        assert_eq!((*ok, *reason), (false, "Failed"));
        assert!(message.contains("1/2 dataplanes serve generation 3; dp-2: answering 500: plugin x"), "{message}");
    }

    #[test]
    fn a_conflicted_api_is_not_accepted_and_names_the_winner_and_route() {
        let c = Conflict { winner: "team-a/orders".into(), host: None, listen_path: "/orders/".into() };
        let w = api_conditions(&outcome(), Some(&c), &Tally { serving: 0, live: 1, problems: vec![] });
        let (ty, ok, reason, message) = &w.conditions[0];
        assert_eq!((*ty, *ok, *reason), ("Accepted", false, "Conflicted"));
        assert_eq!(
            message,
            "spec.listenPath: /orders/ on any host is already served by team-a/orders, which is older; this API is not served"
        );
        let invalid = Outcome { accepted: Err("spec.upstream: bad".into()), ..outcome() };
        let w = api_conditions(&invalid, Some(&c), &Tally { serving: 0, live: 1, problems: vec![] });
        assert_eq!(w.conditions[0].2, "Invalid", "an invalid spec is reported first");
    }

    #[test]
    fn an_unprogrammable_api_says_why_whatever_the_dataplanes_ack() {
        let o = Outcome { unprogrammable: Some(crate::compile::TLS_NOT_STREAMED.into()), ..outcome() };
        let w = api_conditions(&o, None, &Tally { serving: 2, live: 2, problems: vec![] });
        let (_, ok, reason, message) = &w.conditions[2];
        assert_eq!((*ok, *reason), (false, "Unsupported"));
        assert!(
            message.starts_with("spec.tls: certificates reach dataplanes only over a TLS config stream"),
            "{message}"
        );
    }

    #[test]
    fn no_dataplanes_is_not_programmed() {
        let w = plugin_conditions(&outcome(), &Tally { serving: 0, live: 0, problems: vec![] });
        assert_eq!(w.conditions.last().map(|c| (c.0, c.1, c.2)), Some(("Loaded", false, "NoDataplanes")));
    }
}
