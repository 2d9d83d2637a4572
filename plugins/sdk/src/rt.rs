//! What the SDK's macros expand to: the `extern "C"` entry points. Each only converts
//! pointers, then calls safe code inside a panic guard. Not for direct use.
#![allow(unsafe_code)]

use std::{
    cell::{Cell, RefCell},
    ffi::c_void,
    panic::{AssertUnwindSafe, catch_unwind},
    ptr::null_mut,
    sync::atomic::{AtomicPtr, Ordering},
};

use crate::{
    Flow, Hook,
    abi::*,
    call::{Call, Record, Request, Response},
};

static HOST: AtomicPtr<gh_host_api> = AtomicPtr::new(null_mut());

thread_local! {
    /// The call being run on this thread, so that `info!` and friends need no argument.
    static CURRENT: Cell<*mut gh_call> = const { Cell::new(null_mut()) };
    /// Where the panic hook leaves the message and location of the last panic.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub(crate) fn host() -> Option<&'static gh_host_api> {
    let p = HOST.load(Ordering::Acquire);
    // SAFETY: only `init` stores here, a pointer to the host's table, which is a static in
    // the host and so lives as long as this library (the host never unloads plugins).
    unsafe { p.as_ref() }
}

/// Used by `testing` to stand in for a host.
pub(crate) fn set_host(h: &'static gh_host_api) {
    HOST.store((h as *const gh_host_api).cast_mut(), Ordering::Release);
}

fn write_err(err: *mut gh_buf, msg: &str) {
    // SAFETY: the host passes a valid buffer or null.
    let Some(buf) = (unsafe { err.as_mut() }) else { return };
    let mut n = msg.len().min(buf.cap);
    while !msg.is_char_boundary(n) {
        n -= 1;
    }
    if !buf.ptr.is_null() {
        // SAFETY: `buf.ptr` has room for `cap >= n` bytes; `msg` is n readable bytes.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.ptr, n) };
        buf.len = n;
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(recorded) = LAST_PANIC.with(|l| l.borrow_mut().take()) {
        return recorded;
    }
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// The declaration's `init`: remembers the host, quiets panic output (the host logs them
/// instead), then runs the plugin's own initialisation.
///
/// # Safety
/// `host` is null or the host's API table, a static; `err` is null or a valid buffer.
pub unsafe fn init(host: *const gh_host_api, err: *mut gh_buf, f: impl FnOnce() -> Result<(), String>) -> i32 {
    // SAFETY: the host passes its table, a static, or null.
    let Some(table) = (unsafe { host.as_ref() }) else {
        write_err(err, "no host API table");
        return 1;
    };
    if (table.size as usize) < size_of::<gh_host_api>() {
        write_err(err, "the gateway is older than this plugin's SDK: rebuild the plugin against the gateway's SDK");
        return 1;
    }
    set_host(table);
    // This library has its own copy of std, so this hook sees only this plugin's panics.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        LAST_PANIC.with(|l| *l.borrow_mut() = Some(format!("{msg}{at}")));
    }));
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            write_err(err, &e);
            1
        }
        Err(p) => {
            write_err(err, &format!("init panicked: {}", panic_text(p.as_ref())));
            1
        }
    }
}

/// Logs through the host, tagged with the current call's plugin and hook.
pub fn log(level: gh_level, msg: &str) {
    match host() {
        Some(h) => {
            let call = CURRENT.with(Cell::get);
            // SAFETY: `call` is the live call on this thread, or null outside hooks; both
            // are valid for `log`.
            unsafe { (h.log)(call, level, gh_str::new(msg.as_bytes())) }
        }
        None => eprintln!("{msg}"),
    }
}

/// Runs a hook body with `call` as the current call, turning its outcome (or its panic)
/// into a status.
pub(crate) fn run(call: *mut gh_call, f: impl FnOnce(&'static gh_host_api) -> Flow) -> gh_status {
    let Some(host) = host() else { return GH_ERROR };
    let prev = CURRENT.with(|c| c.replace(call));
    // AssertUnwindSafe: after a panic nothing borrowed by the hook is used again; the
    // views into this call are dropped, and the plugin's shared state reports poisoning
    // through its own locks.
    let outcome = catch_unwind(AssertUnwindSafe(|| f(host)));
    CURRENT.with(|c| c.set(prev));
    let (status, msg) = match outcome {
        Ok(Flow::Continue) => return GH_CONTINUE,
        Ok(Flow::Respond) => return GH_RESPOND,
        Ok(Flow::Error { status, message }) => {
            if status != 500 {
                // SAFETY: `call` is the live call the host passed in; `init` checked the
                // table has every 1.1 entry.
                unsafe { (host.set_error_status)(call, status) };
            }
            (GH_ERROR, message)
        }
        Err(p) => (GH_PANIC, format!("hook panicked: {}", panic_text(p.as_ref()))),
    };
    // SAFETY: `call` is the live call the host passed in.
    unsafe { (host.set_error)(call, gh_str::new(msg.as_bytes())) };
    status
}

/// # Safety
/// `instance` is null or was made by `create_config`.
unsafe fn config_of<'a>(instance: *mut c_void) -> &'a str {
    // SAFETY: per the contract, a non-null instance is a leaked `Box<String>` that lives
    // until `destroy_config`, which the host calls only after the last hook call.
    unsafe { instance.cast::<String>().as_ref() }.map_or("null", String::as_str)
}

/// # Safety
/// Called by the host per the ABI: a live `call`, an instance from `create_config`.
pub unsafe fn on_request_fn(instance: *mut c_void, call: *mut gh_call, f: fn(&mut Request<'_>) -> Flow) -> gh_status {
    // SAFETY: per this function's contract.
    let config = unsafe { config_of(instance) };
    run(call, |host| f(&mut Request::new(Call::new(call, host, config))))
}

/// # Safety
/// As `on_request_fn`.
pub unsafe fn on_response_fn(instance: *mut c_void, call: *mut gh_call, f: fn(&mut Response<'_>) -> Flow) -> gh_status {
    // SAFETY: per this function's contract.
    let config = unsafe { config_of(instance) };
    run(call, |host| f(&mut Response::new(Call::new(call, host, config))))
}

/// # Safety
/// As `on_request_fn`.
pub unsafe fn on_analytics_fn(instance: *mut c_void, call: *mut gh_call, f: fn(&mut Record<'_>) -> Flow) -> gh_status {
    // SAFETY: per this function's contract.
    let config = unsafe { config_of(instance) };
    run(call, |host| f(&mut Record::new(Call::new(call, host, config))))
}

/// `create` for function hooks: keeps the entry's config for `Request::config`.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn create_config(config: gh_str, instance: *mut *mut c_void, _err: *mut gh_buf) -> i32 {
    // SAFETY: the host passes `config` readable for this call and a valid out pointer.
    unsafe {
        let text = String::from_utf8_lossy(config.as_bytes()).into_owned();
        *instance = Box::into_raw(Box::new(text)).cast();
    }
    0
}

/// # Safety
/// `instance` came from `create_config` and is not used again.
pub unsafe extern "C" fn destroy_config(instance: *mut c_void) {
    if !instance.is_null() {
        // SAFETY: per the contract, this is the Box leaked by `create_config`.
        let config = unsafe { Box::from_raw(instance.cast::<String>()) };
        drop_contained("hook config", config);
    }
}

/// Drops `value` inside a panic guard: `destroy` returns nothing, so a panic in a `Drop`
/// is logged through the host rather than unwound into it (which would abort the gateway).
fn drop_contained<T>(what: &str, value: Box<T>) {
    // AssertUnwindSafe: the value is gone either way; nothing it borrowed is used again.
    if let Err(p) = catch_unwind(AssertUnwindSafe(move || drop(value))) {
        log(GH_LOG_ERROR, &format!("{what} panicked while being dropped: {}", panic_text(p.as_ref())));
    }
}

/// `create` for `Hook` types.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn create_hook<T: Hook>(config: gh_str, instance: *mut *mut c_void, err: *mut gh_buf) -> i32 {
    // SAFETY: the host passes `config` readable for this call.
    let text = String::from_utf8_lossy(unsafe { config.as_bytes() }).into_owned();
    match catch_unwind(|| T::new(&text)) {
        Ok(Ok(hook)) => {
            // SAFETY: the host passes a valid out pointer.
            unsafe { *instance = Box::into_raw(Box::new(hook)).cast() };
            0
        }
        Ok(Err(e)) => {
            write_err(err, &e);
            1
        }
        Err(p) => {
            write_err(err, &format!("config constructor panicked: {}", panic_text(p.as_ref())));
            1
        }
    }
}

/// # Safety
/// `instance` came from `create_hook::<T>` and is not used again.
pub unsafe extern "C" fn destroy_hook<T: Hook>(instance: *mut c_void) {
    if !instance.is_null() {
        // SAFETY: per the contract, this is the Box leaked by `create_hook::<T>`.
        let hook = unsafe { Box::from_raw(instance.cast::<T>()) };
        drop_contained(std::any::type_name::<T>(), hook);
    }
}

/// # Safety
/// A live `call`; `instance` from `create_hook::<T>`.
pub unsafe fn on_request_hook<T: Hook>(instance: *mut c_void, call: *mut gh_call) -> gh_status {
    // SAFETY: the instance is a live `T` until `destroy_hook`, shared (`T: Sync`).
    let Some(hook) = (unsafe { instance.cast::<T>().as_ref() }) else {
        return GH_ERROR;
    };
    run(call, |host| hook.on_request(&mut Request::new(Call::new(call, host, "null"))))
}

/// # Safety
/// As `on_request_hook`.
pub unsafe fn on_response_hook<T: Hook>(instance: *mut c_void, call: *mut gh_call) -> gh_status {
    // SAFETY: as in `on_request_hook`.
    let Some(hook) = (unsafe { instance.cast::<T>().as_ref() }) else {
        return GH_ERROR;
    };
    run(call, |host| hook.on_response(&mut Response::new(Call::new(call, host, "null"))))
}

/// # Safety
/// As `on_request_hook`.
pub unsafe fn on_analytics_hook<T: Hook>(instance: *mut c_void, call: *mut gh_call) -> gh_status {
    // SAFETY: as in `on_request_hook`.
    let Some(hook) = (unsafe { instance.cast::<T>().as_ref() }) else {
        return GH_ERROR;
    };
    run(call, |host| hook.on_analytics(&mut Record::new(Call::new(call, host, "null"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct PanicsWhenDropped;

    impl Hook for PanicsWhenDropped {
        fn new(_config: &str) -> Result<Self, String> {
            Ok(PanicsWhenDropped)
        }
    }

    impl Drop for PanicsWhenDropped {
        fn drop(&mut self) {
            panic!("dropped");
        }
    }

    #[test]
    fn destroy_contains_a_panic_in_drop() {
        let instance = Box::into_raw(Box::new(PanicsWhenDropped)).cast::<c_void>();
        // An unwind out of an `extern "C"` function aborts this whole test process.
        // SAFETY: the instance is a leaked Box of the type, destroyed once.
        unsafe { destroy_hook::<PanicsWhenDropped>(instance) };
    }
}
