/* The C half of the Go SDK: the plugin declaration, the trampolines the host calls, and
 * wrappers that call the host's function table (cgo cannot call C function pointers). */
#ifndef GATEHOUSE_GO_BRIDGE_H
#define GATEHOUSE_GO_BRIDGE_H

#include "gatehouse_plugin.h"

/* The hook call running on this thread, so the logger can tag lines with its API. */
gh_call *gh_go_current(void);

/* How many hooks (names) one bundle may register. */
#define GH_GO_MAX_HOOKS 1024

/* The hook table of registered hook number `index` (0-based); NULL past the maximum. */
const gh_hook *gh_go_table(uint32_t index, uint32_t flags, int request, int response, int analytics);

void gh_go_log(gh_call *call, gh_level level, const char *msg, size_t len);
void gh_go_set_error(gh_call *call, const char *msg, size_t len);
int32_t gh_go_set_error_status(gh_call *call, uint16_t status);
gh_str gh_go_request_method(gh_call *call);
gh_str gh_go_request_path(gh_call *call);
gh_str gh_go_request_query(gh_call *call);
gh_str gh_go_client_ip(gh_call *call);
/* Up to `cap` headers of `target` into `out` (views); returns how many there are. */
size_t gh_go_headers(gh_call *call, gh_target target, gh_pair *out, size_t cap);
int32_t gh_go_header_set(gh_call *call, gh_target target, const char *n, size_t nl, const char *v, size_t vl);
int32_t gh_go_header_add(gh_call *call, gh_target target, const char *n, size_t nl, const char *v, size_t vl);
int32_t gh_go_header_remove(gh_call *call, gh_target target, const char *n, size_t nl);
int32_t gh_go_body_get(gh_call *call, gh_target target, gh_str *out);
int32_t gh_go_body_set(gh_call *call, gh_target target, const char *b, size_t len);
uint16_t gh_go_response_status(gh_call *call);
int32_t gh_go_response_set_status(gh_call *call, uint16_t status);
int32_t gh_go_request_set_method(gh_call *call, const char *s, size_t len);
int32_t gh_go_request_set_path(gh_call *call, const char *s, size_t len);
int32_t gh_go_request_set_query(gh_call *call, const char *s, size_t len);
int32_t gh_go_session_json(gh_call *call, gh_str *out);
int32_t gh_go_session_meta_set(gh_call *call, const char *k, size_t kl, const char *v, size_t vl);
int32_t gh_go_session_create(gh_call *call, const gh_session_init *init);
gh_str gh_go_api_id(gh_call *call);
gh_str gh_go_api_name(gh_call *call);
gh_str gh_go_api_listen_path(gh_call *call);
gh_str gh_go_api_config_data(gh_call *call);
gh_str gh_go_api_spec(gh_call *call);
int32_t gh_go_record_get(gh_call *call, const char *n, size_t nl, gh_str *out);
int32_t gh_go_record_set(gh_call *call, const char *n, size_t nl, const char *v, size_t vl);
int32_t gh_go_record_drop(gh_call *call, const char *n, size_t nl);
int32_t gh_go_record_add_tag(gh_call *call, const char *t, size_t tl);
int32_t gh_go_record_set_meta(gh_call *call, const char *k, size_t kl, const char *v, size_t vl);

#endif
