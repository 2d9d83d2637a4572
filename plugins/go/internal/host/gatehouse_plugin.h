/*
 * Gatehouse native plugin ABI, version 1.1.
 *
 * A plugin is a shared object that exports `gatehouse_plugin`, a `gh_plugin` declaration
 * (exactly one). Its hooks are `gh_hook` tables, found by the name ApiDefinitions use as
 * `symbol`:
 *   - ABI 1.1 plugins (abi_minor >= 1) answer `find_hook(name)`; the host looks hooks up
 *     only that way, never in the dynamic symbol table;
 *   - ABI 1.0 plugins export each `gh_hook` as a data symbol under that name.
 *
 * 1.1 added, each at the end of its struct: gh_plugin.find_hook and .quiesce,
 * gh_hook.magic and .create_for, gh_session_init.alias and .meta, the gh_host_api calls
 * from request_set_method on, and GH_PLUGIN_GO_RUNTIME; then the analytics phase:
 * gh_hook.on_analytics and the gh_host_api record calls from record_get on. A 1.0 plugin keeps working with a
 * 1.1 host: the host reads the new gh_plugin fields only when abi_minor >= 1, and the new
 * gh_hook / gh_session_init fields only when their `size` covers them.
 *
 * The host reads the declaration before running anything, and refuses a different
 * `abi_major`, a plugin without GH_PLUGIN_PANIC_SAFE, or a missing symbol. Within a major
 * version, structs only grow at the end and tables start with their size.
 *
 * Threads: hooks run concurrently on the gateway's worker threads; shared state must be
 * thread-safe. A hook blocks its worker thread while it runs: keep hooks short.
 * Memory: gh_str views the host returns stay valid until the hook returns or the same item
 * is changed. Views a plugin passes in need only live for the call; the host copies them.
 * Kept in sync with plugins/sdk/src/abi.rs by plugins/sdk/tests/header.rs.
 */
#ifndef GATEHOUSE_PLUGIN_H
#define GATEHOUSE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define GH_MAGIC 0x47415445484F5553ULL /* "GATEHOUS" */
#define GH_ABI_MAJOR 1
#define GH_ABI_MINOR 1

/* gh_plugin.flags */
#define GH_PLUGIN_PANIC_SAFE 1u /* never unwinds into the host nor aborts (C: always) */
/* 1.1: the library carries a Go runtime. Go supports one runtime per process, so the host
 * refuses a second distinct library with this flag (a new Go bundle needs a restart). */
#define GH_PLUGIN_GO_RUNTIME 2u

/* 1.1: gh_hook.magic */
#define GH_HOOK_MAGIC 0x474850484F4F4B31ULL /* "GHPHOOK1" */

/* gh_hook.flags: buffer the body before the hook runs, so body_get returns it */
#define GH_HOOK_REQUEST_BODY 1u
#define GH_HOOK_RESPONSE_BODY 2u

typedef int32_t gh_status;
#define GH_CONTINUE 0 /* go on with the chain */
#define GH_RESPOND 1  /* send the response the hook set up; the upstream is not called */
#define GH_ERROR 2    /* fail: the gateway answers 500 (set_error gives the reason) */
#define GH_PANIC 3    /* a caught panic: 500, counted */

typedef uint32_t gh_target;
#define GH_REQUEST 0
#define GH_RESPONSE 1

typedef uint32_t gh_level;
#define GH_LOG_ERROR 1
#define GH_LOG_WARN 2
#define GH_LOG_INFO 3
#define GH_LOG_DEBUG 4

typedef struct gh_str {
  const uint8_t *ptr;
  size_t len;
} gh_str;

/* A host-owned buffer for an error message: write up to `cap` bytes, set `len`. */
typedef struct gh_buf {
  uint8_t *ptr;
  size_t cap;
  size_t len;
} gh_buf;

typedef struct gh_call gh_call; /* opaque: one hook call */
typedef struct gh_host_api gh_host_api;
typedef struct gh_hook gh_hook;

typedef struct gh_plugin {
  uint64_t magic;
  uint16_t abi_major;
  uint16_t abi_minor;
  uint32_t flags;
  gh_str sdk; /* who built it, shown in errors */
  /* once per load, before any hook; non-zero (with err filled) refuses the load */
  int32_t (*init)(const gh_host_api *host, gh_buf *err);
  /* 1.1 (read only when abi_minor >= 1). The hook ApiDefinitions name `name`, or NULL.
   * The returned table must be static (live as long as the library). Required in 1.1. */
  const gh_hook *(*find_hook)(gh_str name);
  /* 1.1: called once when no loaded configuration uses this library any more (it stays
   * mapped). Stop background threads here. If the same file comes back later, hooks are
   * called again: restart lazily. May be NULL. */
  void (*quiesce)(void);
} gh_plugin;

struct gh_hook {
  uint32_t size;
  uint32_t flags;
  /* once per ApiDefinition entry, with its `config` as JSON ("null" when unset); may be NULL */
  int32_t (*create)(gh_str config, void **instance, gh_buf *err);
  void (*destroy)(void *instance); /* may be NULL */
  /* pre, authCheck, postKeyAuth, post; NULL if not handled */
  gh_status (*on_request)(void *instance, gh_call *call);
  /* response; NULL if not handled */
  gh_status (*on_response)(void *instance, gh_call *call);
  /* 1.1, present when size >= offsetof(gh_hook, create_for) + sizeof(void *). */
  uint64_t magic; /* GH_HOOK_MAGIC */
  /* Like create, with the hook's own table: one trampoline can serve many hooks. When
   * set, the host calls it instead of create. May be NULL. */
  int32_t (*create_for)(const gh_hook *self, gh_str config, void **instance, gh_buf *err);
  /* 1.1, analytics phase, present when size >= offsetof(gh_hook, on_analytics) +
   * sizeof(void *). Runs once per analytics record of the API (`middleware.analytics`),
   * in order, before the record reaches the sink: off the request path, on the gateway's
   * analytics thread. Uses the record_* host calls. GH_ERROR or GH_PANIC: the record is
   * written as it was before this hook. NULL (or a shorter table): not handled. */
  gh_status (*on_analytics)(void *instance, gh_call *call);
};

/* 1.1: a key and a value (session metadata). */
typedef struct gh_pair {
  gh_str key;
  gh_str value;
} gh_pair;

typedef struct gh_session_init {
  uint32_t size;
  uint32_t _reserved;
  gh_str id;             /* rate limits and quotas count per id */
  uint64_t rate;         /* rate requests every per_ms; 0 = none */
  uint64_t per_ms;
  int64_t quota_max;     /* per quota_renewal_ms; -1 = unlimited */
  uint64_t quota_renewal_ms;
  const gh_str *access_rights; /* ApiDefinition names; none = the API being called */
  size_t access_rights_len;
  /* 1.1, read when size covers them. */
  gh_str alias;          /* shown in analytics and session_id; empty = id */
  const gh_pair *meta;   /* the session's metadata */
  size_t meta_len;
} gh_session_init;

typedef void (*gh_header_cb)(void *ctx, gh_str name, gh_str value);

/* i32 results: 1 found/done, 0 absent, -1 invalid here (bad header, wrong phase).
 * A gh_call is valid only on the thread that received it, during that hook call: any
 * other use (kept after the hook returned, another thread, a header change from inside a
 * headers_each callback) is refused with -1 / an empty view and logged. */
struct gh_host_api {
  uint32_t size;
  uint32_t abi_minor;
  void (*log)(gh_call *call, gh_level level, gh_str msg); /* call may be NULL */
  void (*set_error)(gh_call *call, gh_str msg);
  gh_str (*request_method)(gh_call *call);
  gh_str (*request_path)(gh_call *call);
  gh_str (*request_query)(gh_call *call);
  gh_str (*client_ip)(gh_call *call);
  int32_t (*header_get)(gh_call *call, gh_target target, gh_str name, size_t index, gh_str *out);
  void (*headers_each)(gh_call *call, gh_target target, void *ctx, gh_header_cb cb);
  int32_t (*header_set)(gh_call *call, gh_target target, gh_str name, gh_str value);
  int32_t (*header_add)(gh_call *call, gh_target target, gh_str name, gh_str value);
  int32_t (*header_remove)(gh_call *call, gh_target target, gh_str name);
  int32_t (*body_get)(gh_call *call, gh_target target, gh_str *out);
  int32_t (*body_set)(gh_call *call, gh_target target, gh_str body);
  uint16_t (*response_status)(gh_call *call);
  int32_t (*response_set_status)(gh_call *call, uint16_t status);
  int32_t (*session_id)(gh_call *call, gh_str *out);
  int32_t (*session_json)(gh_call *call, gh_str *out);
  int32_t (*session_meta_get)(gh_call *call, gh_str key, gh_str *out);
  int32_t (*session_meta_set)(gh_call *call, gh_str key, gh_str value);
  int32_t (*session_create)(gh_call *call, const gh_session_init *init);
  gh_str (*api_id)(gh_call *call);
  gh_str (*api_name)(gh_call *call);
  gh_str (*api_listen_path)(gh_call *call);
  gh_str (*api_config_data)(gh_call *call);
  gh_str (*api_spec)(gh_call *call);
  /* 1.1 (size tells). Request rewrites: the upstream sees them; routing is not re-run.
   * method: an HTTP token. path: origin-form, starting with '/', normalised as the gateway
   * normalises requests (refused if it climbs above the root or hides '/' as %2F).
   * query: without '?', URI characters only; empty removes it. -1 (and a log line) if
   * refused or in the response phase. */
  int32_t (*request_set_method)(gh_call *call, gh_str method);
  int32_t (*request_set_path)(gh_call *call, gh_str path);
  int32_t (*request_set_query)(gh_call *call, gh_str query);
  /* Every value of header `name`: up to `cap` views into `out`, the total in *count.
   * 1 if any, 0 if none, -1 invalid. Call again with a bigger `out` if *count > cap. */
  int32_t (*header_values)(gh_call *call, gh_target target, gh_str name, gh_str *out, size_t cap,
                           size_t *count);
  /* Replaces every value of header `name` with `values` (none removes it); all or nothing. */
  int32_t (*header_replace)(gh_call *call, gh_target target, gh_str name, const gh_str *values,
                            size_t len);
  /* With GH_ERROR: answer this status (400-599) instead of 500, with a JSON error. */
  int32_t (*set_error_status)(gh_call *call, uint16_t status);

  /* ---- 1.1, analytics phase (size tells): the record an on_analytics hook sees.
   * Outside the analytics phase each returns -1 (logged once per hook); in it, the request
   * calls above (request_*, header*, body*, response_*, session_*) return -1 / an empty
   * view. log, set_error and api_* work in every phase.
   * Fields by name: time, api_id, api_name, method, path, status, latency_total_ms,
   * latency_upstream_ms, key_id, key_alias, client_ip, request_bytes, response_bytes,
   * plugin_answered, error, and with detailedRecording request_body, response_body
   * (+ request_body_capture, response_body_capture: whole | cut | incomplete). */
  /* The field as text (numbers in decimal, true/false, bodies as bytes): 1 found,
   * 0 absent / null / dropped. */
  int32_t (*record_get)(gh_call *call, gh_str name, gh_str *out);
  /* Sets or brings back a field: text fields take UTF-8, numbers and booleans their text
   * form ("200", "true"), bodies any bytes. -1: unknown field or wrong type. */
  int32_t (*record_set)(gh_call *call, gh_str name, gh_str value);
  /* Removes a field (also "tags", "meta_data"): 1 removed, 0 absent. */
  int32_t (*record_drop)(gh_call *call, gh_str name);
  /* Appends a tag (UTF-8) to the record's tags. */
  int32_t (*record_add_tag)(gh_call *call, gh_str tag);
  /* Sets a meta_data entry of the record (UTF-8); the key's session is unchanged. */
  int32_t (*record_set_meta)(gh_call *call, gh_str key, gh_str value);
};

/* Convenience: a gh_str from a C string literal. */
#define GH_STR(lit) ((gh_str){(const uint8_t *)(lit), sizeof(lit) - 1})

#ifdef __cplusplus
}
#endif
#endif /* GATEHOUSE_PLUGIN_H */
