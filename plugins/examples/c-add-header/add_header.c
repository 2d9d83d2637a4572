/*
 * A Gatehouse plugin in C: adds a header to the request. The header's value comes from
 * the entry's config (a JSON string), or is "hello from C". The gateway finds the hook
 * through `find_hook` (ABI 1.1), never by a symbol name.
 *
 *   cc -shared -fPIC -O2 -I plugins/sdk/include -o libc_add_header.so add_header.c
 *
 *   middleware:
 *     pre: [{plugin: c-add-header, symbol: AddHeader, config: "v1"}]
 */
#include <stdlib.h>
#include <string.h>

#include "gatehouse_plugin.h"

#ifndef VERSION
#define VERSION "c-example"
#endif

static const gh_host_api *host;

static int32_t init(const gh_host_api *h, gh_buf *err) {
  (void)err;
  host = h;
  host->log(NULL, GH_LOG_INFO, GH_STR("C plugin " VERSION " loaded"));
  return 0;
}

/* The instance is the header value: the config's JSON string without quotes. */
static int32_t create(gh_str config, void **instance, gh_buf *err) {
  const char *fallback = "hello from C";
  const uint8_t *p = config.ptr;
  size_t n = config.len;
  if (n >= 2 && p[0] == '"' && p[n - 1] == '"') {
    p++;
    n -= 2;
  } else {
    p = (const uint8_t *)fallback;
    n = strlen(fallback);
  }
  char *value = malloc(n + 1);
  if (!value) {
    const char *msg = "out of memory";
    err->len = strlen(msg) < err->cap ? strlen(msg) : err->cap;
    memcpy(err->ptr, msg, err->len);
    return 1;
  }
  memcpy(value, p, n);
  value[n] = 0;
  *instance = value;
  return 0;
}

static void destroy(void *instance) { free(instance); }

static gh_status on_request(void *instance, gh_call *call) {
  const char *value = instance;
  gh_str v = {(const uint8_t *)value, strlen(value)};
  host->header_set(call, GH_REQUEST, GH_STR("X-C-Plugin"), v);
  host->header_set(call, GH_REQUEST, GH_STR("X-C-Plugin-Version"), GH_STR(VERSION));
  return GH_CONTINUE;
}

static const gh_hook AddHeader = {
    .size = sizeof(gh_hook),
    .flags = 0,
    .create = create,
    .destroy = destroy,
    .on_request = on_request,
    .on_response = NULL,
    .magic = GH_HOOK_MAGIC,
    .create_for = NULL,
};

/* The hooks ApiDefinitions may name as `symbol`. */
static const gh_hook *find_hook(gh_str name) {
  static const char add_header[] = "AddHeader";
  if (name.len == sizeof(add_header) - 1 && memcmp(name.ptr, add_header, name.len) == 0) return &AddHeader;
  return NULL;
}

/* Called once no configuration uses this library any more; nothing to stop here. */
static void quiesce(void) { host->log(NULL, GH_LOG_INFO, GH_STR("C plugin " VERSION " quiesced")); }

const gh_plugin gatehouse_plugin = {
    .magic = GH_MAGIC,
    .abi_major = GH_ABI_MAJOR,
    .abi_minor = GH_ABI_MINOR,
    .flags = GH_PLUGIN_PANIC_SAFE,
    .sdk = GH_STR("c-add-header (C)"),
    .init = init,
    .find_hook = find_hook,
    .quiesce = quiesce,
};
