//! Write Gatehouse plugins in Rust without touching a raw pointer.
//!
//! A plugin is a `cdylib` crate that declares itself once and exports hooks under the
//! names ApiDefinitions use as `symbol`:
//!
//! ```ignore
//! use gatehouse_plugin::{Flow, Request, declare_plugin, hook, info};
//!
//! declare_plugin!(hooks: [AddFooBarHeader]);
//! hook!(request AddFooBarHeader = add_foo_bar_header);
//!
//! fn add_foo_bar_header(req: &mut Request) -> Flow {
//!     info!("Processing HTTP request in Rust plugin!!");
//!     req.add_header("Foo", "Bar");
//!     Flow::Continue
//! }
//! ```
//!
//! Hooks run concurrently on the gateway's threads: state shared between calls lives in
//! `declare_plugin!(state: T = init_fn)` (built once per load, `T: Send + Sync`) or in
//! statics. A panic in a hook is caught here and answered with a 500 by the gateway, which
//! keeps serving.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod abi;
mod call;
#[doc(hidden)]
pub mod rt;
pub mod testing;

pub use call::{Api, Record, Reply, Request, RequestView, Response, Session, SessionInit};
pub use serde_json;

/// The SDK's version, carried in every plugin's declaration.
pub const SDK_VERSION: &str = concat!("gatehouse-plugin ", env!("CARGO_PKG_VERSION"));

/// What a hook tells the gateway to do next.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the chain.
    Continue,
    /// Send the response this hook set up (see [`Request::respond`]); the upstream is not
    /// called and later hooks do not run. Analytics still record the request.
    Respond,
    /// Fail the request: the gateway answers `status` (500 unless set, see
    /// [`Flow::error_status`]) with a JSON error, and logs `message`.
    Error {
        /// The status the client gets: 400-599 (anything else is answered as 500).
        status: u16,
        /// Why, for the gateway's log (not sent to the client).
        message: String,
    },
}

impl Flow {
    /// Fails the request with a 500; `msg` goes to the gateway's log.
    pub fn error(msg: impl Into<String>) -> Self {
        Flow::Error { status: 500, message: msg.into() }
    }

    /// Fails the request with `status` (400-599), e.g. `Flow::error_status(403, "no tenant")`;
    /// the client gets that status and a JSON error, `msg` goes to the gateway's log.
    pub fn error_status(status: u16, msg: impl Into<String>) -> Self {
        Flow::Error { status, message: msg.into() }
    }
}

/// A hook with per-entry state built from the ApiDefinition entry's `config` (JSON).
/// Both phases default to `Continue`; export with `hook!(Name: Type)`.
pub trait Hook: Sized + Send + Sync + 'static {
    /// Buffer the request body so [`Request::body`] returns it.
    const REQUEST_BODY: bool = false;
    /// Buffer the upstream response body so [`Response::body`] returns it.
    const RESPONSE_BODY: bool = false;
    /// `config` is the entry's `config` as JSON, `null` when unset. An error refuses the
    /// entry: the API answers 500, or skips the hook under `failurePolicy: Ignore`.
    fn new(config: &str) -> Result<Self, String>;
    /// Runs in `pre`, `authCheck`, `postKeyAuth` and `post`.
    fn on_request(&self, _req: &mut Request<'_>) -> Flow {
        Flow::Continue
    }
    /// Runs in `response`, with the upstream's answer.
    fn on_response(&self, _resp: &mut Response<'_>) -> Flow {
        Flow::Continue
    }
    /// Runs in `analytics`, on each analytics record of the API before it is written (off
    /// the request path). `Flow::Respond` means the same as `Continue` here; an error
    /// leaves the record as it was before this hook.
    fn on_analytics(&self, _rec: &mut Record<'_>) -> Flow {
        Flow::Continue
    }
}

/// Declares the plugin: exactly once per plugin crate, naming every hook it exports.
///
/// - `declare_plugin!(hooks: [A, B]);`
/// - `declare_plugin!(state: T = build, hooks: [A, B]);` where
///   `fn build() -> Result<T, String>` runs once per load; hooks reach the value with
///   `state()`.
///
/// The list is what the gateway can find (ABI 1.1 `find_hook`: the gateway never looks
/// hooks up in the library's symbol table). It cannot drift from the `hook!`s: a name
/// listed without its `hook!` does not compile, and neither does a `hook!` whose name is
/// not listed. `declare_plugin!` and the `hook!`s live in the same module.
#[macro_export]
macro_rules! declare_plugin {
    (hooks: [$($hook:ident),* $(,)?] $(,)?) => {
        $crate::__declaration!(|| ::std::result::Result::Ok(()), [$($hook),*]);
    };
    (state: $ty:ty = $build:expr, hooks: [$($hook:ident),* $(,)?] $(,)?) => {
        static __GATEHOUSE_STATE: ::std::sync::OnceLock<$ty> = ::std::sync::OnceLock::new();
        /// The plugin's state, built once when the gateway loaded it.
        fn state() -> &'static $ty {
            // Initialised by the declaration's init, which the host runs before any hook.
            __GATEHOUSE_STATE.get().expect("gatehouse: plugin state used before init")
        }
        $crate::__declaration!(
            || {
                let built: ::std::result::Result<$ty, ::std::string::String> = ($build)();
                __GATEHOUSE_STATE.set(built?).map_err(|_| "plugin initialised twice".to_owned())
            },
            [$($hook),*]
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __declaration {
    ($init:expr, [$($hook:ident),*]) => {
        /// The hooks `declare_plugin!` lists: each `hook!` checks it is here.
        #[doc(hidden)]
        mod __gatehouse_listed {
            $(
                #[allow(unused_imports)]
                pub(super) use super::$hook;
            )*
        }

        #[allow(non_upper_case_globals)]
        #[unsafe(no_mangle)]
        pub static gatehouse_plugin: $crate::abi::gh_plugin = $crate::abi::gh_plugin {
            magic: $crate::abi::GH_MAGIC,
            abi_major: $crate::abi::GH_ABI_MAJOR,
            abi_minor: $crate::abi::GH_ABI_MINOR,
            flags: if cfg!(panic = "unwind") { $crate::abi::GH_PLUGIN_PANIC_SAFE } else { 0 },
            sdk: $crate::abi::gh_str::from_static($crate::SDK_VERSION),
            init: {
                unsafe extern "C" fn init(host: *const $crate::abi::gh_host_api, err: *mut $crate::abi::gh_buf) -> i32 {
                    // SAFETY: called by the host per the ABI, with its static table and a
                    // valid error buffer.
                    unsafe { $crate::rt::init(host, err, $init) }
                }
                Some(init)
            },
            find_hook: {
                unsafe extern "C" fn find_hook(name: $crate::abi::gh_str) -> *const $crate::abi::gh_hook {
                    // SAFETY: the host passes a view readable for this call.
                    let name = unsafe { name.as_bytes() };
                    $(
                        if name == stringify!($hook).as_bytes() {
                            return &$hook;
                        }
                    )*
                    ::std::ptr::null()
                }
                Some(find_hook)
            },
            quiesce: None,
        };
    };
}

/// Exports a hook under `Name`, the `symbol` an ApiDefinition names.
///
/// - `hook!(request Name = f);` with `fn f(&mut Request) -> Flow`, for `pre`,
///   `authCheck`, `postKeyAuth` and `post`.
/// - `hook!(response Name = f);` with `fn f(&mut Response) -> Flow`, for `response`.
/// - `hook!(request(body) Name = f);` / `hook!(response(body) Name = f);` also buffer the
///   body so the hook can read it.
/// - `hook!(analytics Name = f);` with `fn f(&mut Record) -> Flow`, for `analytics`: runs
///   on each analytics record before it is written (Tyk's analytics plugins). Bodies are
///   in the record when the entry sets `detailedRecording: true`.
/// - `hook!(Name: T);` with `T: Hook`, for per-entry state from the entry's `config`.
#[macro_export]
macro_rules! hook {
    (request $name:ident = $f:path) => { $crate::hook!(@fn $name, 0, request, $f); };
    (request(body) $name:ident = $f:path) => { $crate::hook!(@fn $name, $crate::abi::GH_HOOK_REQUEST_BODY, request, $f); };
    (response $name:ident = $f:path) => { $crate::hook!(@fn $name, 0, response, $f); };
    (response(body) $name:ident = $f:path) => { $crate::hook!(@fn $name, $crate::abi::GH_HOOK_RESPONSE_BODY, response, $f); };
    (analytics $name:ident = $f:path) => {
        $crate::hook!(@table $name, 0, $crate::rt::create_config, $crate::rt::destroy_config, None, None, {
            unsafe extern "C" fn on_analytics(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                // SAFETY: called by the host per the ABI.
                unsafe { $crate::rt::on_analytics_fn(i, c, $f) }
            }
            Some(on_analytics)
        });
    };
    (@fn $name:ident, $flags:expr, request, $f:path) => {
        $crate::hook!(@table $name, $flags, $crate::rt::create_config, $crate::rt::destroy_config, {
            unsafe extern "C" fn on_request(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                // SAFETY: called by the host per the ABI.
                unsafe { $crate::rt::on_request_fn(i, c, $f) }
            }
            Some(on_request)
        }, None, None);
    };
    (@fn $name:ident, $flags:expr, response, $f:path) => {
        $crate::hook!(@table $name, $flags, $crate::rt::create_config, $crate::rt::destroy_config, None, {
            unsafe extern "C" fn on_response(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                // SAFETY: called by the host per the ABI.
                unsafe { $crate::rt::on_response_fn(i, c, $f) }
            }
            Some(on_response)
        }, None);
    };
    ($name:ident : $ty:ty) => {
        $crate::hook!(@table $name,
            (if <$ty as $crate::Hook>::REQUEST_BODY { $crate::abi::GH_HOOK_REQUEST_BODY } else { 0 })
                | (if <$ty as $crate::Hook>::RESPONSE_BODY { $crate::abi::GH_HOOK_RESPONSE_BODY } else { 0 }),
            $crate::rt::create_hook::<$ty>, $crate::rt::destroy_hook::<$ty>,
            {
                unsafe extern "C" fn on_request(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                    // SAFETY: called by the host per the ABI.
                    unsafe { $crate::rt::on_request_hook::<$ty>(i, c) }
                }
                Some(on_request)
            },
            {
                unsafe extern "C" fn on_response(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                    // SAFETY: called by the host per the ABI.
                    unsafe { $crate::rt::on_response_hook::<$ty>(i, c) }
                }
                Some(on_response)
            },
            {
                unsafe extern "C" fn on_analytics(i: *mut ::std::ffi::c_void, c: *mut $crate::abi::gh_call) -> $crate::abi::gh_status {
                    // SAFETY: called by the host per the ABI.
                    unsafe { $crate::rt::on_analytics_hook::<$ty>(i, c) }
                }
                Some(on_analytics)
            });
    };
    (@table $name:ident, $flags:expr, $create:expr, $destroy:expr, $on_request:expr, $on_response:expr, $on_analytics:expr) => {
        // Not listed in `declare_plugin!(hooks: [...])`, the gateway could never find it:
        // a compile error here, not a "symbol not found" at run time.
        use self::__gatehouse_listed::$name as _;
        // Found through `declare_plugin!(hooks: [...])`, never by its symbol name.
        #[allow(non_upper_case_globals)]
        static $name: $crate::abi::gh_hook = $crate::abi::gh_hook {
            size: ::std::mem::size_of::<$crate::abi::gh_hook>() as u32,
            flags: $flags,
            create: Some($create),
            destroy: Some($destroy),
            on_request: $on_request,
            on_response: $on_response,
            magic: $crate::abi::GH_HOOK_MAGIC,
            create_for: None,
            on_analytics: $on_analytics,
        };
    };
}

/// Logs at info level through the gateway's logger, tagged with the plugin and the hook
/// being run; `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::rt::log($crate::abi::GH_LOG_INFO, &::std::format!($($t)*)) };
}
/// Logs at warn level; as [`info!`].
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::rt::log($crate::abi::GH_LOG_WARN, &::std::format!($($t)*)) };
}
/// Logs at error level; as [`info!`].
#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::rt::log($crate::abi::GH_LOG_ERROR, &::std::format!($($t)*)) };
}
/// Logs at debug level; as [`info!`].
#[macro_export]
macro_rules! debug {
    ($($t:tt)*) => { $crate::rt::log($crate::abi::GH_LOG_DEBUG, &::std::format!($($t)*)) };
}
