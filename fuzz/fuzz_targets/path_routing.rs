//! Request paths: normalisation is idempotent and leaves nothing a lenient upstream could
//! resolve differently (`//`, `.`/`..` segments, encoded `/` or `\`, control bytes), and
//! routing the normalised path picks the API whose listen path is its longest segment prefix.
#![no_main]

use std::sync::OnceLock;

use gatehouse_crds::{manifest, snapshot::Snapshot};
use gatehouse_dataplane::{
    key_id::KeyIdSecret,
    metrics::Metrics,
    path::normalise,
    runtime::{Changed, Runtime},
};
use gatehouse_plugin_host::Loader;
use libfuzzer_sys::fuzz_target;

/// (API name, listen path).
const APIS: &[(&str, &str)] = &[
    ("root", "/"),
    ("a", "/a/"),
    ("ab", "/a/b/"),
    ("abc", "/abc/"),
    ("api", "/api/"),
    ("v1", "/api/v1/"),
    ("dots", "/x.y/"),
];

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let yaml: String = APIS
            .iter()
            .map(|(name, path)| {
                format!(
                    "---\napiVersion: gatehouse.dev/v1alpha1\nkind: ApiDefinition\nmetadata: {{name: {name}}}\nspec:\n  listenPath: {path}\n  upstream: {{url: 'http://127.0.0.1:1'}}\n"
                )
            })
            .collect();
        let parsed = manifest::parse("fuzz.yaml", &yaml);
        assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
        let (snapshot, errors) = Snapshot::compile(1, parsed.resources.into_iter().map(|(_, r)| r));
        assert!(errors.is_empty(), "{errors:?}");
        let key_ids = KeyIdSecret::new(b"fuzz key id secret");
        Runtime::build(&snapshot, &Metrics::new(), &Loader::new(std::env::temp_dir()), &key_ids, &Default::default(), None, &Changed::All)
    })
}

/// The longest listen path that is a whole-segment prefix of `path`, by brute force.
fn expected(path: &str) -> Option<&'static str> {
    APIS.iter()
        .map(|(name, lp)| (*name, lp.trim_end_matches('/')))
        .filter(|(_, key)| path == *key || path.strip_prefix(key).is_some_and(|rest| rest.starts_with('/')))
        .max_by_key(|(_, key)| key.len())
        .map(|(name, _)| name)
}

fuzz_target!(|raw: &str| {
    let Ok(path) = normalise(raw) else { return };
    let again = normalise(&path).map(|p| p.into_owned());
    assert_eq!(again.as_deref(), Ok(&*path), "normalise({raw:?}) = {path:?} is not a fixed point");
    assert!(!path.contains("//"), "{raw:?} -> {path:?} keeps an empty segment");
    assert!(path.split('/').all(|seg| seg != "." && seg != ".."), "{raw:?} -> {path:?} keeps a dot segment");
    let lower = path.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{raw:?} -> {path:?} keeps an encoded separator");
    assert!(!path.bytes().any(|b| b.is_ascii_control()), "{raw:?} -> {path:?} keeps a control byte");

    let routed = runtime().router.route(None, &path).map(|api| api.entry.name.as_str());
    assert_eq!(routed, expected(&path), "{raw:?} -> {path:?} routed to the wrong API");
});
