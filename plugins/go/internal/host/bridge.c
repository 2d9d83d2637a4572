#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "_cgo_export.h"
#include "bridge.h"

static const gh_host_api *host;
static __thread gh_call *current;

gh_call *gh_go_current(void) { return current; }

static int32_t go_init(const gh_host_api *h, gh_buf *err) {
  /* The calls the SDK uses, up to the last of them, must all be in the host's table. */
  if (h->abi_minor < 1 || h->size < offsetof(gh_host_api, record_set_meta) + sizeof(void *)) {
    static const char why[] = "the Go SDK needs a gateway speaking plugin ABI 1.1";
    size_t n = sizeof(why) - 1 < err->cap ? sizeof(why) - 1 : err->cap;
    memcpy(err->ptr, why, n);
    err->len = n;
    return 1;
  }
  host = h;
  return ghgoInit(err);
}

static const gh_hook *go_find_hook(gh_str name) { return ghgoFindHook((char *)name.ptr, name.len); }

static void go_quiesce(void) { ghgoQuiesce(); }

__attribute__((visibility("default"))) const gh_plugin gatehouse_plugin = {
    .magic = GH_MAGIC,
    .abi_major = GH_ABI_MAJOR,
    .abi_minor = GH_ABI_MINOR,
    .flags = GH_PLUGIN_PANIC_SAFE | GH_PLUGIN_GO_RUNTIME,
    .sdk = GH_STR("gatehouse.dev/go"),
    .init = go_init,
    .find_hook = go_find_hook,
    .quiesce = go_quiesce,
};

/* Each trampoline marks the call as this thread's current one while Go runs it. */
#define TRAMPOLINE(name, export)                                  \
  static gh_status name(void *instance, gh_call *call) {          \
    gh_call *prev = current;                                      \
    current = call;                                               \
    gh_status s = export((uintptr_t)instance, call);              \
    current = prev;                                               \
    return s;                                                     \
  }
TRAMPOLINE(go_on_request, ghgoOnRequest)
TRAMPOLINE(go_on_response, ghgoOnResponse)
TRAMPOLINE(go_on_analytics, ghgoOnAnalytics)

/* The host accepts only hook tables inside the library's own image, so they are static. */
static gh_hook tables[GH_GO_MAX_HOOKS];

static int32_t go_create(const gh_hook *self, gh_str config, void **instance, gh_buf *err) {
  (void)config;
  (void)err;
  /* The instance is the hook's registry number + 1, so it is never NULL. */
  *instance = (void *)(uintptr_t)(self - tables + 1);
  return 0;
}

const gh_hook *gh_go_table(uint32_t index, uint32_t flags, int request, int response, int analytics) {
  if (index >= GH_GO_MAX_HOOKS) return NULL;
  gh_hook *t = &tables[index];
  t->size = sizeof(gh_hook);
  t->flags = flags;
  t->magic = GH_HOOK_MAGIC;
  t->create_for = go_create;
  t->on_request = request ? go_on_request : NULL;
  t->on_response = response ? go_on_response : NULL;
  t->on_analytics = analytics ? go_on_analytics : NULL;
  return t;
}

#define S(p, l) ((gh_str){(const uint8_t *)(p), (l)})

void gh_go_log(gh_call *call, gh_level level, const char *msg, size_t len) {
  if (host != NULL) host->log(call, level, S(msg, len));
}
void gh_go_set_error(gh_call *call, const char *msg, size_t len) { host->set_error(call, S(msg, len)); }
int32_t gh_go_set_error_status(gh_call *call, uint16_t status) { return host->set_error_status(call, status); }
gh_str gh_go_request_method(gh_call *call) { return host->request_method(call); }
gh_str gh_go_request_path(gh_call *call) { return host->request_path(call); }
gh_str gh_go_request_query(gh_call *call) { return host->request_query(call); }
gh_str gh_go_client_ip(gh_call *call) { return host->client_ip(call); }

typedef struct {
  gh_pair *out;
  size_t cap;
  size_t n;
} collect;

static void collect_one(void *ctx, gh_str name, gh_str value) {
  collect *c = ctx;
  if (c->n < c->cap) {
    c->out[c->n].key = name;
    c->out[c->n].value = value;
  }
  c->n++;
}

size_t gh_go_headers(gh_call *call, gh_target target, gh_pair *out, size_t cap) {
  collect c = {out, cap, 0};
  host->headers_each(call, target, &c, collect_one);
  return c.n;
}

int32_t gh_go_header_set(gh_call *call, gh_target t, const char *n, size_t nl, const char *v, size_t vl) {
  return host->header_set(call, t, S(n, nl), S(v, vl));
}
int32_t gh_go_header_add(gh_call *call, gh_target t, const char *n, size_t nl, const char *v, size_t vl) {
  return host->header_add(call, t, S(n, nl), S(v, vl));
}
int32_t gh_go_header_remove(gh_call *call, gh_target t, const char *n, size_t nl) {
  return host->header_remove(call, t, S(n, nl));
}
int32_t gh_go_body_get(gh_call *call, gh_target t, gh_str *out) { return host->body_get(call, t, out); }
int32_t gh_go_body_set(gh_call *call, gh_target t, const char *b, size_t len) {
  return host->body_set(call, t, S(b, len));
}
uint16_t gh_go_response_status(gh_call *call) { return host->response_status(call); }
int32_t gh_go_response_set_status(gh_call *call, uint16_t s) { return host->response_set_status(call, s); }
int32_t gh_go_request_set_method(gh_call *call, const char *s, size_t l) {
  return host->request_set_method(call, S(s, l));
}
int32_t gh_go_request_set_path(gh_call *call, const char *s, size_t l) { return host->request_set_path(call, S(s, l)); }
int32_t gh_go_request_set_query(gh_call *call, const char *s, size_t l) {
  return host->request_set_query(call, S(s, l));
}
int32_t gh_go_session_json(gh_call *call, gh_str *out) { return host->session_json(call, out); }
int32_t gh_go_session_meta_set(gh_call *call, const char *k, size_t kl, const char *v, size_t vl) {
  return host->session_meta_set(call, S(k, kl), S(v, vl));
}
int32_t gh_go_session_create(gh_call *call, const gh_session_init *init) { return host->session_create(call, init); }
gh_str gh_go_api_id(gh_call *call) { return host->api_id(call); }
gh_str gh_go_api_name(gh_call *call) { return host->api_name(call); }
gh_str gh_go_api_listen_path(gh_call *call) { return host->api_listen_path(call); }
gh_str gh_go_api_config_data(gh_call *call) { return host->api_config_data(call); }
gh_str gh_go_api_spec(gh_call *call) { return host->api_spec(call); }
int32_t gh_go_record_get(gh_call *call, const char *n, size_t nl, gh_str *out) {
  return host->record_get(call, S(n, nl), out);
}
int32_t gh_go_record_set(gh_call *call, const char *n, size_t nl, const char *v, size_t vl) {
  return host->record_set(call, S(n, nl), S(v, vl));
}
int32_t gh_go_record_drop(gh_call *call, const char *n, size_t nl) { return host->record_drop(call, S(n, nl)); }
int32_t gh_go_record_add_tag(gh_call *call, const char *t, size_t tl) { return host->record_add_tag(call, S(t, tl)); }
int32_t gh_go_record_set_meta(gh_call *call, const char *k, size_t kl, const char *v, size_t vl) {
  return host->record_set_meta(call, S(k, kl), S(v, vl));
}
