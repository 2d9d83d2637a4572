//! What hooks see of the gateway's own types: the API a request was routed to, and the
//! request's session. The dataplane's `Api` and `Session` provide them, so the host needs
//! nothing from the dataplane, and the dataplane's `Api` can hold the hooks it runs.
//!
//! A host call only borrows: every text is the API's or the session's own, computed when
//! the runtime was built, so reading one costs a virtual call and no copy.

use std::sync::Arc;

use gatehouse_crds::KeySession;

/// The API a hook runs for (`api_id`, `api_name`, `api_listen_path`, `api_config_data`,
/// `api_spec`, and the defaults of `session_create`).
pub trait HookApi: Sync {
    /// `namespace/name`: what logs and `api_id` name the API by.
    fn id(&self) -> &str;
    /// `metadata.name`: what a key's access rights grant.
    fn name(&self) -> &str;
    /// `metadata.namespace`: a session a hook creates grants APIs there only.
    fn namespace(&self) -> &str;
    /// What `api_name` returns (the API's display name).
    fn display_name(&self) -> &str;
    fn listen_path(&self) -> &str;
    /// `spec.configData` as JSON, `null` when unset.
    fn config_data_json(&self) -> &str;
    /// The whole `spec` as JSON.
    fn spec_json(&self) -> &str;
}

/// A session as hooks read it.
#[derive(Clone, Copy)]
pub struct SessionView<'a> {
    /// What `session_id` returns: the key Secret's `namespace/name`, or the alias (else the
    /// id) the hook that created the session gave.
    pub alias: &'a str,
    /// The keyed id analytics name a key by, never its plain hash; none for sessions a
    /// hook created.
    pub key_id: Option<&'a str>,
    pub session: &'a KeySession,
}

/// What `session_create` asked for, checked.
pub struct NewSession<'a> {
    /// The API's namespace: the session grants APIs there only.
    pub namespace: &'a str,
    /// `namespace/name` of the Plugin whose hook created it: its rate and quota counters
    /// are the plugin's own, apart from keys'.
    pub plugin: &'a str,
    pub id: &'a str,
    /// Empty for none (the id stands in).
    pub alias: &'a str,
    pub session: KeySession,
}

/// A session type of the gateway, as hooks use it.
pub trait HookSession: Clone + Send + Sync {
    fn view(&self) -> SessionView<'_>;
    fn key_session_mut(&mut self) -> &mut KeySession;
    /// The session an `authCheck` hook creates.
    fn from_hook(new: NewSession<'_>) -> Self;
}

/// Where a request's session is kept, as host calls reach it: the dataplane's
/// `Option<Arc<Session>>` itself, borrowed for the phase, so nothing is copied per call.
pub trait SessionSlot: Send {
    fn get(&self) -> Option<SessionView<'_>>;
    /// This request's own copy of the session's fields: copy-on-write, so the key's
    /// shared session is never changed, only this request's.
    fn key_session_mut(&mut self) -> Option<&mut KeySession>;
    /// Replaces the request's session with one a hook created.
    fn set(&mut self, new: NewSession<'_>);
}

impl<S: HookSession> SessionSlot for Option<Arc<S>> {
    fn get(&self) -> Option<SessionView<'_>> {
        self.as_deref().map(S::view)
    }

    fn key_session_mut(&mut self) -> Option<&mut KeySession> {
        self.as_mut().map(|s| Arc::make_mut(s).key_session_mut())
    }

    fn set(&mut self, new: NewSession<'_>) {
        *self = Some(Arc::new(S::from_hook(new)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Key {
        alias: String,
        session: KeySession,
    }

    impl HookSession for Key {
        fn view(&self) -> SessionView<'_> {
            SessionView { alias: &self.alias, key_id: None, session: &self.session }
        }
        fn key_session_mut(&mut self) -> &mut KeySession {
            &mut self.session
        }
        fn from_hook(new: NewSession<'_>) -> Self {
            let alias = if new.alias.is_empty() { new.id } else { new.alias };
            Self { alias: alias.to_owned(), session: new.session }
        }
    }

    #[test]
    fn a_hook_changes_only_its_requests_copy_of_a_shared_session() {
        let shared = Arc::new(Key { alias: "default/alice".to_owned(), session: KeySession::default() });
        let mut slot = Some(shared.clone());
        let s: &mut dyn SessionSlot = &mut slot;
        s.key_session_mut().expect("a session").meta_data.insert("tier".to_owned(), "gold".to_owned());
        assert_eq!(s.get().map(|v| v.session.meta_data.get("tier").cloned()), Some(Some("gold".to_owned())));
        assert!(shared.session.meta_data.is_empty(), "the key's own session is unchanged");

        let mut none: Option<Arc<Key>> = None;
        let s: &mut dyn SessionSlot = &mut none;
        assert!(s.key_session_mut().is_none() && s.get().is_none());
        s.set(NewSession {
            namespace: "default",
            plugin: "default/auth",
            id: "u1",
            alias: "",
            session: KeySession::default(),
        });
        assert_eq!(s.get().map(|v| v.alias), Some("u1"), "no alias: the id stands in");
    }
}
