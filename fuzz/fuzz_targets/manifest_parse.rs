//! Manifests as a user writes them: whatever the text, `parse` returns (never panics), every
//! rejection names the file, and every accepted ApiDefinition or Plugin reads back the same
//! after being written out again (as the controller and `kubectl get -o yaml` do).
#![no_main]

use gatehouse_crds::{
    manifest::{self, Resource},
    snapshot::Snapshot,
};
use libfuzzer_sys::fuzz_target;

const ORIGIN: &str = "fuzz.yaml";

fuzz_target!(|text: &str| {
    let parsed = manifest::parse(ORIGIN, text);
    for r in &parsed.rejected {
        assert!(r.error.resource.starts_with(ORIGIN), "a rejection that does not name the file: {:?}", r.error);
        assert!(!r.error.reason.is_empty(), "a rejection without a reason: {:?}", r.error);
    }
    for (id, resource) in &parsed.resources {
        match resource {
            Resource::Api(api) => {
                let again = reparse(id, &serde_json::to_string(api).expect("an ApiDefinition serialises"));
                let Resource::Api(again) = again else { panic!("{id} came back as another kind") };
                assert_eq!(api.spec, again.spec, "{id}: spec changed across a write and a read");
            }
            Resource::Plugin(p) => {
                let again = reparse(id, &serde_json::to_string(p).expect("a Plugin serialises"));
                let Resource::Plugin(again) = again else { panic!("{id} came back as another kind") };
                assert_eq!(p.spec, again.spec, "{id}: spec changed across a write and a read");
            }
            Resource::Key(_) | Resource::Certificate(_) | Resource::CaCertificate(_) => {}
        }
    }
    // What the parser accepts, the snapshot compiler takes without panicking.
    let _ = Snapshot::compile(1, parsed.resources.into_iter().map(|(_, r)| r));
});

fn reparse(id: &manifest::ResourceId, json: &str) -> Resource {
    // JSON is YAML: the parser must read its own output.
    let mut again = manifest::parse(ORIGIN, json);
    assert!(again.rejected.is_empty(), "{id} accepted, but not once written out: {:?}\n{json}", again.rejected);
    assert_eq!(again.resources.len(), 1, "{id}: {json}");
    let (id2, r) = again.resources.remove(0);
    assert_eq!(*id, id2);
    r
}
