//! The C header and the Rust ABI definitions describe the same layout: a C compiler
//! reports every size and field offset, and they must equal Rust's.
#![allow(clippy::unwrap_used)]

use std::{mem::offset_of, path::Path, process::Command};

use gatehouse_plugin::abi::*;

macro_rules! layout {
    ($($ty:ident { $($field:ident),* })*) => {{
        let mut rust = Vec::new();
        let mut c = String::new();
        $(
            rust.push(format!("{} size {}", stringify!($ty), size_of::<$ty>()));
            c.push_str(&format!("printf(\"{} size %zu\\n\", sizeof({}));\n", stringify!($ty), stringify!($ty)));
            $(
                rust.push(format!("{}.{} {}", stringify!($ty), stringify!($field), offset_of!($ty, $field)));
                c.push_str(&format!("printf(\"{}.{} %zu\\n\", offsetof({}, {}));\n", stringify!($ty), stringify!($field), stringify!($ty), stringify!($field)));
            )*
        )*
        (rust, c)
    }};
}

#[test]
fn c_header_matches_rust_layout_and_constants() {
    let (rust, body) = layout! {
        gh_str { ptr, len }
        gh_buf { ptr, cap, len }
        gh_plugin { magic, abi_major, abi_minor, flags, sdk, init, find_hook, quiesce }
        gh_hook { size, flags, create, destroy, on_request, on_response, magic, create_for, on_analytics }
        gh_pair { key, value }
        gh_session_init { size, _reserved, id, rate, per_ms, quota_max, quota_renewal_ms, access_rights, access_rights_len,
            alias, meta, meta_len }
        gh_host_api { size, abi_minor, log, set_error, request_method, request_path, request_query, client_ip,
            header_get, headers_each, header_set, header_add, header_remove, body_get, body_set,
            response_status, response_set_status, session_id, session_json, session_meta_get, session_meta_set,
            session_create, api_id, api_name, api_listen_path, api_config_data, api_spec,
            request_set_method, request_set_path, request_set_query, header_values, header_replace, set_error_status,
            record_get, record_set, record_drop, record_add_tag, record_set_meta }
    };
    let consts = [
        ("GH_MAGIC", GH_MAGIC),
        ("GH_ABI_MAJOR", GH_ABI_MAJOR.into()),
        ("GH_ABI_MINOR", GH_ABI_MINOR.into()),
        ("GH_PLUGIN_PANIC_SAFE", GH_PLUGIN_PANIC_SAFE.into()),
        ("GH_PLUGIN_GO_RUNTIME", GH_PLUGIN_GO_RUNTIME.into()),
        ("GH_HOOK_MAGIC", GH_HOOK_MAGIC),
        ("GH_HOOK_REQUEST_BODY", GH_HOOK_REQUEST_BODY.into()),
        ("GH_HOOK_RESPONSE_BODY", GH_HOOK_RESPONSE_BODY.into()),
        ("GH_CONTINUE", GH_CONTINUE as u64),
        ("GH_RESPOND", GH_RESPOND as u64),
        ("GH_ERROR", GH_ERROR as u64),
        ("GH_PANIC", GH_PANIC as u64),
        ("GH_REQUEST", GH_REQUEST.into()),
        ("GH_RESPONSE", GH_RESPONSE.into()),
        ("GH_LOG_ERROR", GH_LOG_ERROR.into()),
        ("GH_LOG_WARN", GH_LOG_WARN.into()),
        ("GH_LOG_INFO", GH_LOG_INFO.into()),
        ("GH_LOG_DEBUG", GH_LOG_DEBUG.into()),
    ];
    let mut rust = rust;
    let mut body = body;
    for (name, v) in consts {
        rust.push(format!("{name} {v}"));
        body.push_str(&format!("printf(\"{name} %llu\\n\", (unsigned long long)({name}));\n"));
    }

    let dir = tempfile_dir();
    let src = dir.join("layout.c");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    std::fs::write(
        &src,
        format!("#include <stdio.h>\n#include \"gatehouse_plugin.h\"\nint main(void) {{\n{body}return 0;\n}}\n"),
    )
    .unwrap();
    let exe = dir.join("layout");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-pedantic", "-I"])
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("{cc} must be installed (scripts/test.sh installs gcc): {e}"));
    assert!(out.status.success(), "the header does not compile:\n{}", String::from_utf8_lossy(&out.stderr));
    let printed = Command::new(&exe).output().unwrap();
    let c: Vec<String> = String::from_utf8(printed.stdout).unwrap().lines().map(str::to_owned).collect();
    assert_eq!(c, rust);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("gh-header-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
