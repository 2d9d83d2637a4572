package host

/*
#include <stdlib.h>
#include "bridge.h"
*/
import "C"

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"runtime"
	"strconv"
	"sync"
	"unsafe"
)

const (
	targetRequest  = C.GH_REQUEST
	targetResponse = C.GH_RESPONSE
)

// Call is one hook call: the request (and response) as net/http types, built from the
// gateway's view and written back when the hook returns. Calls are pooled: a hook must
// not keep r, rw, res or their bodies after it returns.
type Call struct {
	raw   *C.gh_call
	entry *entry

	req *http.Request
	// blank is a request with nothing but the call's context: each call starts from it,
	// so nothing a hook did to r (a new context, path values) reaches the next request.
	blank   http.Request
	url     url.URL
	reqHdr  http.Header
	reqSnap snapshot
	reqBody io.ReadCloser // what r.Body was given, to tell whether the hook replaced it
	// What the hook may change on the request, as the gateway sent it.
	method, path, query, hostName string
	decoded                       string // c.url.Path as given
	responding                    bool   // a response hook: there is an upstream response

	res     *http.Response
	resHdr  http.Header
	resSnap snapshot
	resBody io.ReadCloser
	status  int

	rw writer
	// The host's header views, in C memory: a Go buffer holding pointers would be scanned
	// by cgo's pointer check on every call.
	pairs *cPairs
	// Canonical forms of header names seen before, so most names cost no allocation.
	canon map[string]string

	// Session and Definition cache what ctx decoded during this call.
	Session    any
	Definition any
}

func newCall() *Call {
	c := &Call{reqHdr: http.Header{}, resHdr: http.Header{}, canon: map[string]string{}, pairs: newPairs(32)}
	c.blank = *(&http.Request{}).WithContext(&callCtx{Context: context.Background(), c: c})
	c.req = &http.Request{}
	c.res = &http.Response{}
	c.rw.h = http.Header{}
	return c
}

// cPairs is a C buffer of header views. It has a finalizer of its own, and no pointer back
// to its Call: a finalizer on an object in a cycle (a Call points to itself) never runs.
type cPairs struct {
	p *C.gh_pair
	n int
}

func newPairs(n int) *cPairs {
	b := &cPairs{p: (*C.gh_pair)(C.malloc(C.size_t(n) * C.size_t(unsafe.Sizeof(C.gh_pair{})))), n: n}
	runtime.SetFinalizer(b, func(b *cPairs) { C.free(unsafe.Pointer(b.p)) })
	return b
}

// snapshot is what the gateway sent of one header map, to tell what a hook changed.
type snapshot struct {
	spans []span   // one per header name, in the order the gateway sent them
	vals  []string // every value, as sent; spans index into it
	// slow: the gateway sent one name's values apart, so orig holds them instead.
	slow bool
	orig http.Header
}

type span struct {
	key      string // "" once taken out (Host)
	start, n int
}

const maxCanon = 512

// canonical is textproto's canonical form of a header name, remembered for later calls
// (up to maxCanon names, so a client sending endless new names cannot grow the cache).
func (c *Call) canonical(raw []byte) string {
	if k, ok := c.canon[string(raw)]; ok {
		return k
	}
	k := textproto.CanonicalMIMEHeaderKey(string(raw))
	if len(c.canon) < maxCanon {
		c.canon[string(raw)] = k
	}
	return k
}

// headers fills h with the gateway's headers of target and records them in snap. The
// values are copied into one allocation; each name's values are a slice of one array,
// capped so that a hook's append copies rather than overwrites the next name's.
func (c *Call) headers(target C.gh_target, h http.Header, snap *snapshot) {
	clear(h)
	snap.spans, snap.vals, snap.slow = snap.spans[:0], snap.vals[:0], false
	n := int(C.gh_go_headers(c.raw, target, c.pairs.p, C.size_t(c.pairs.n)))
	if n > c.pairs.n {
		c.pairs = newPairs(n)
		n = min(int(C.gh_go_headers(c.raw, target, c.pairs.p, C.size_t(c.pairs.n))), c.pairs.n)
	}
	if n == 0 {
		return
	}
	pairs := unsafe.Slice(c.pairs.p, n)
	total := 0
	for _, p := range pairs {
		total += int(p.value.len)
	}
	buf := make([]byte, total)
	live := make([]string, n)
	off := 0
	for i, p := range pairs {
		k := c.canonical(view(p.key))
		v := ""
		if l := int(p.value.len); l > 0 {
			copy(buf[off:], view(p.value))
			v = unsafe.String(&buf[off], l)
			off += l
		}
		live[i] = v
		snap.vals = append(snap.vals, v)
		if last := len(snap.spans) - 1; last >= 0 && snap.spans[last].key == k {
			snap.spans[last].n++
			continue
		}
		snap.spans = append(snap.spans, span{key: k, start: i, n: 1})
	}
	for _, sp := range snap.spans {
		h[sp.key] = live[sp.start : sp.start+sp.n : sp.start+sp.n]
	}
	// The gateway sends a name's values together; fewer names than spans means it did not.
	if len(h) != len(snap.spans) {
		snap.slow = true
		c.headersApart(h, snap)
	}
}

// headersApart builds h and snap.orig one value at a time, for a name whose values did
// not arrive together.
func (c *Call) headersApart(h http.Header, snap *snapshot) {
	clear(h)
	if snap.orig == nil {
		snap.orig = http.Header{}
	}
	clear(snap.orig)
	for _, sp := range snap.spans {
		for _, v := range snap.vals[sp.start : sp.start+sp.n] {
			h[sp.key] = append(h[sp.key], v)
			snap.orig[sp.key] = append(snap.orig[sp.key], v)
		}
	}
}

// take removes name from h and the snapshot and returns its first value.
func (snap *snapshot) take(h http.Header, name string) string {
	v := h.Get(name)
	delete(h, name)
	if snap.slow {
		delete(snap.orig, name)
	}
	for i := range snap.spans {
		if snap.spans[i].key == name {
			snap.spans[i].key = ""
		}
	}
	return v
}

func (snap *snapshot) has(k string) bool {
	if snap.slow {
		_, ok := snap.orig[k]
		return ok
	}
	for _, sp := range snap.spans {
		if sp.key == k {
			return true
		}
	}
	return false
}

func (c *Call) loadRequest() {
	*c.req = c.blank
	r := c.req
	c.method = gostr(C.gh_go_request_method(c.raw))
	c.path = gostr(C.gh_go_request_path(c.raw))
	c.query = gostr(C.gh_go_request_query(c.raw))
	c.headers(targetRequest, c.reqHdr, &c.reqSnap)
	c.hostName = c.reqSnap.take(c.reqHdr, "Host")

	c.url = url.URL{Path: c.path, RawQuery: c.query}
	if p, err := url.PathUnescape(c.path); err == nil {
		c.url.Path, c.url.RawPath = p, c.path
	}
	c.decoded = c.url.Path
	r.Method = c.method
	r.URL = &c.url
	r.Proto, r.ProtoMajor, r.ProtoMinor = "HTTP/1.1", 1, 1
	r.Header = c.reqHdr
	r.Host = c.hostName
	// With a port, as net/http gives it, so net.SplitHostPort works (the gateway knows
	// only the client's address).
	r.RemoteAddr = net.JoinHostPort(gostr(C.gh_go_client_ip(c.raw)), "0")
	r.RequestURI = c.path
	if c.query != "" {
		r.RequestURI = c.path + "?" + c.query
	}
	// As net/http's server: no Content-Length is 0, unless the body is chunked (unknown).
	r.ContentLength = contentLength(c.reqHdr)
	if r.ContentLength < 0 && len(c.reqHdr["Transfer-Encoding"]) == 0 {
		r.ContentLength = 0
	}
	c.reqBody = newBody(c, targetRequest)
	r.Body = c.reqBody
	c.rw.reset()
}

func (c *Call) loadResponse() {
	c.responding = true
	c.status = int(C.gh_go_response_status(c.raw))
	c.headers(targetResponse, c.resHdr, &c.resSnap)
	res := c.res
	*res = http.Response{
		Status:     strconv.Itoa(c.status) + " " + http.StatusText(c.status),
		StatusCode: c.status,
		Proto:      "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header:  c.resHdr,
		Request: c.req,
	}
	res.ContentLength = contentLength(c.resHdr)
	c.resBody = newBody(c, targetResponse)
	res.Body = c.resBody
}

func contentLength(h http.Header) int64 {
	if v := h["Content-Length"]; len(v) > 0 {
		if n, err := strconv.ParseInt(v[0], 10, 64); err == nil {
			return n
		}
	}
	return -1
}

// finishRequest writes back what a request hook did: its own response, or its changes to
// the request (and response headers for later).
func (c *Call) finishRequest() C.gh_status {
	if c.rw.wrote {
		c.applyWriter()
		return C.GH_RESPOND
	}
	r := c.req
	if r.Method != c.method {
		c.check("method", C.gh_go_request_set_method(c.raw, cstr(r.Method), C.size_t(len(r.Method))))
	}
	if r.URL != nil {
		// Only a changed path is sent: EscapedPath re-escapes characters the gateway
		// accepts raw, which would rewrite paths no hook touched.
		if r.URL.Path != c.decoded || r.URL.RawPath != c.path {
			p := r.URL.EscapedPath()
			c.check("path", C.gh_go_request_set_path(c.raw, cstr(p), C.size_t(len(p))))
		}
		if r.URL.RawQuery != c.query {
			q := r.URL.RawQuery
			c.check("query", C.gh_go_request_set_query(c.raw, cstr(q), C.size_t(len(q))))
		}
	}
	if r.Host != c.hostName && r.Host != "" {
		c.setHeader(targetRequest, "Host", []string{r.Host})
	}
	c.writeChanges(targetRequest, r.Header, &c.reqSnap)
	if r.Body != c.reqBody && r.Body != nil {
		c.replaceBody(targetRequest, r.Body)
	}
	if len(c.rw.h) > 0 {
		c.writeHeaders(targetResponse, c.rw.h, nil)
	}
	return C.GH_CONTINUE
}

func (c *Call) finishResponse() C.gh_status {
	if c.rw.wrote {
		c.applyWriter()
		return C.GH_CONTINUE
	}
	res := c.res
	if res.StatusCode != c.status {
		c.check("status", C.gh_go_response_set_status(c.raw, C.uint16_t(res.StatusCode)))
	}
	c.writeChanges(targetResponse, res.Header, &c.resSnap)
	if res.Body != c.resBody && res.Body != nil {
		c.replaceBody(targetResponse, res.Body)
	}
	c.writeHeaders(targetResponse, c.rw.h, nil)
	return C.GH_CONTINUE
}

// applyWriter makes what the hook wrote through rw the response, as net/http would send
// it: the headers as they were at WriteHeader, a sniffed Content-Type when none was set.
// Over an upstream response (a response hook that wrote), the upstream's content headers
// no longer describe the body and are dropped.
func (c *Call) applyWriter() {
	c.check("status", C.gh_go_response_set_status(c.raw, C.uint16_t(c.rw.status)))
	h := c.rw.sent
	if _, set := h["Content-Type"]; !set && len(c.rw.body) > 0 {
		h.Set("Content-Type", http.DetectContentType(c.rw.body))
	}
	for _, k := range []string{"Content-Encoding", "Content-Length", "Etag", "Last-Modified", "Content-Range"} {
		if _, set := h[k]; !set && c.responding {
			C.gh_go_header_remove(c.raw, targetResponse, cstr(k), C.size_t(len(k)))
		}
	}
	c.writeHeaders(targetResponse, h, nil)
	b := c.rw.body
	c.check("body", C.gh_go_body_set(c.raw, targetResponse, cbytes(b), C.size_t(len(b))))
}

// writeChanges sends the gateway what differs between h and what it sent (snap).
func (c *Call) writeChanges(target C.gh_target, h http.Header, snap *snapshot) {
	if snap.slow {
		c.writeHeaders(target, h, snap.orig)
		return
	}
	found := 0
	for _, sp := range snap.spans {
		if sp.key == "" {
			continue
		}
		vs, ok := h[sp.key]
		if !ok {
			c.check("header "+sp.key, C.gh_go_header_remove(c.raw, target, cstr(sp.key), C.size_t(len(sp.key))))
			continue
		}
		found++
		if !equal(vs, snap.vals[sp.start:sp.start+sp.n]) {
			c.setHeader(target, sp.key, vs)
		}
	}
	if len(h) != found {
		for k, vs := range h {
			if !snap.has(k) {
				c.setHeader(target, k, vs)
			}
		}
	}
}

// writeHeaders sends the gateway every header of h whose values differ from orig, and
// removes those orig had and h has not (orig nil: h only adds).
func (c *Call) writeHeaders(target C.gh_target, h, orig http.Header) {
	for k, vs := range h {
		if !equal(vs, orig[k]) {
			c.setHeader(target, k, vs)
		}
	}
	for k := range orig {
		if _, ok := h[k]; !ok {
			c.check("header "+k, C.gh_go_header_remove(c.raw, target, cstr(k), C.size_t(len(k))))
		}
	}
}

func (c *Call) setHeader(target C.gh_target, k string, vs []string) {
	if len(vs) == 0 {
		C.gh_go_header_remove(c.raw, target, cstr(k), C.size_t(len(k)))
		return
	}
	for i, v := range vs {
		if i == 0 {
			c.check("header "+k, C.gh_go_header_set(c.raw, target, cstr(k), C.size_t(len(k)), cstr(v), C.size_t(len(v))))
		} else {
			c.check("header "+k, C.gh_go_header_add(c.raw, target, cstr(k), C.size_t(len(k)), cstr(v), C.size_t(len(v))))
		}
	}
}

func (c *Call) replaceBody(target C.gh_target, body io.ReadCloser) {
	b, err := io.ReadAll(body)
	_ = body.Close()
	if err != nil {
		Log(LevelWarn, "Go hook "+c.entry.name+": reading the new body failed: "+err.Error())
		return
	}
	c.check("body", C.gh_go_body_set(c.raw, target, cbytes(b), C.size_t(len(b))))
}

// check logs a change the gateway refused (it logs its own reason too).
func (c *Call) check(what string, rc C.int32_t) {
	if rc < 0 {
		Log(LevelWarn, "Go hook "+c.entry.name+": the gateway refused the "+what+" change")
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// writer is the http.ResponseWriter a hook gets: writing to it answers the request.
type writer struct {
	h      http.Header
	sent   http.Header // h when WriteHeader ran: later changes are ignored, as net/http does
	status int
	body   []byte
	wrote  bool
}

func (w *writer) reset() {
	clear(w.h)
	w.sent, w.status, w.body, w.wrote = nil, 0, w.body[:0], false
}

func (w *writer) Header() http.Header { return w.h }

func (w *writer) WriteHeader(status int) {
	if !w.wrote {
		w.status, w.wrote, w.sent = status, true, w.h.Clone()
	}
}

func (w *writer) Write(b []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	w.body = append(w.body, b...)
	return len(b), nil
}

var errAfterHook = errors.New("gatehouse: body read after the hook returned")

// bodyReader reads the gateway's buffered body in place, fetched on the first Read: a hook
// that never reads the body costs nothing for it. One per call: a reader kept past its
// hook (by a goroutine, say) fails, and never sees a later request's body. The lock keeps
// a Read in another goroutine from copying out of the gateway's buffer while the hook
// returns and the buffer is freed.
type bodyReader struct {
	mu      sync.Mutex
	c       *Call
	target  C.gh_target
	data    []byte
	loaded  bool
	off     int
	expired bool
}

func newBody(c *Call, target C.gh_target) *bodyReader { return &bodyReader{c: c, target: target} }

// expire ends the reader's use of the gateway's memory; called as the hook returns.
func expire(r io.ReadCloser) {
	if b, ok := r.(*bodyReader); ok {
		b.mu.Lock()
		b.data, b.expired = nil, true
		b.mu.Unlock()
	}
}

func (b *bodyReader) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.expired {
		return 0, errAfterHook
	}
	if !b.loaded {
		b.loaded = true
		var out C.gh_str
		if C.gh_go_body_get(b.c.raw, b.target, &out) == 1 {
			b.data = view(out)
		} else if !b.c.entry.body {
			e := b.c.entry
			e.warned.Do(func() {
				Log(LevelWarn, "Go hook "+e.name+" read a body the gateway did not buffer for it: gatehouse-go build buffers bodies for the hooks of packages that use .Body, ParseForm, FormValue, FormFile, MultipartReader or httputil.Dump*, and this hook reads it otherwise (through a helper in another package?)")
			})
		}
	}
	if b.off >= len(b.data) {
		return 0, io.EOF
	}
	n := copy(p, b.data[b.off:])
	b.off += n
	return n, nil
}

func (b *bodyReader) Close() error { return nil }

// ---------------------------------------------------------------- what ctx reads

// Name is the hook's registered name.
func (c *Call) Name() string { return c.entry.name }

// SessionJSON is the session of the request's key as the gateway describes it.
func (c *Call) SessionJSON() ([]byte, bool) {
	var out C.gh_str
	if C.gh_go_session_json(c.raw, &out) != 1 {
		return nil, false
	}
	return view(out), true
}

// SessionInit is what an auth hook's new session holds.
type SessionInit struct {
	ID, Alias      string
	Rate, PerMs    uint64
	QuotaMax       int64
	QuotaRenewalMs uint64
	AccessRights   []string
	Meta           map[string]string
}

// CreateSession gives the request a new session (authCheck only); false elsewhere.
func (c *Call) CreateSession(s SessionInit) bool {
	var frees []unsafe.Pointer
	defer func() {
		for _, p := range frees {
			C.free(p)
		}
	}()
	// The init struct and everything it points to live in C memory: Go memory holding Go
	// pointers may not be passed to C.
	str := func(s string) C.gh_str {
		if s == "" {
			return C.gh_str{}
		}
		p := C.CBytes([]byte(s))
		frees = append(frees, p)
		return C.gh_str{ptr: (*C.uint8_t)(p), len: C.size_t(len(s))}
	}
	alloc := func(n, size uintptr) unsafe.Pointer {
		p := C.calloc(C.size_t(n+1), C.size_t(size))
		frees = append(frees, p)
		return p
	}
	init := (*C.gh_session_init)(alloc(1, unsafe.Sizeof(C.gh_session_init{})))
	init.size = C.uint32_t(unsafe.Sizeof(C.gh_session_init{}))
	init.id, init.alias = str(s.ID), str(s.Alias)
	init.rate, init.per_ms = C.uint64_t(s.Rate), C.uint64_t(s.PerMs)
	init.quota_max, init.quota_renewal_ms = C.int64_t(s.QuotaMax), C.uint64_t(s.QuotaRenewalMs)
	if len(s.AccessRights) > 0 {
		rights := unsafe.Slice((*C.gh_str)(alloc(uintptr(len(s.AccessRights)), unsafe.Sizeof(C.gh_str{}))), len(s.AccessRights))
		for i, r := range s.AccessRights {
			rights[i] = str(r)
		}
		init.access_rights, init.access_rights_len = &rights[0], C.size_t(len(rights))
	}
	if len(s.Meta) > 0 {
		meta := unsafe.Slice((*C.gh_pair)(alloc(uintptr(len(s.Meta)), unsafe.Sizeof(C.gh_pair{}))), len(s.Meta))
		i := 0
		for k, v := range s.Meta {
			meta[i] = C.gh_pair{key: str(k), value: str(v)}
			i++
		}
		init.meta, init.meta_len = &meta[0], C.size_t(len(meta))
	}
	return C.gh_go_session_create(c.raw, init) == 1
}

// SetSessionMeta changes one metadata entry of the request's session (this request only).
func (c *Call) SetSessionMeta(k, v string) bool {
	return C.gh_go_session_meta_set(c.raw, cstr(k), C.size_t(len(k)), cstr(v), C.size_t(len(v))) == 1
}

// API describes the API being called.
type API struct{ ID, Name, ListenPath, ConfigData, Spec string }

// API returns the called API's definition.
func (c *Call) API() API {
	return API{
		ID:         gostr(C.gh_go_api_id(c.raw)),
		Name:       gostr(C.gh_go_api_name(c.raw)),
		ListenPath: gostr(C.gh_go_api_listen_path(c.raw)),
		ConfigData: gostr(C.gh_go_api_config_data(c.raw)),
		Spec:       gostr(C.gh_go_api_spec(c.raw)),
	}
}

// ---------------------------------------------------------------- analytics records

// Field reads an analytics record's field as text.
func (c *Call) Field(name string) (string, bool) {
	var out C.gh_str
	if C.gh_go_record_get(c.raw, cstr(name), C.size_t(len(name)), &out) != 1 {
		return "", false
	}
	return gostr(out), true
}

// SetField sets a record's field from its text form.
func (c *Call) SetField(name, value string) bool {
	return C.gh_go_record_set(c.raw, cstr(name), C.size_t(len(name)), cstr(value), C.size_t(len(value))) == 1
}

// DropField removes a record's field.
func (c *Call) DropField(name string) {
	C.gh_go_record_drop(c.raw, cstr(name), C.size_t(len(name)))
}

// AddTag appends a tag to the record.
func (c *Call) AddTag(tag string) { C.gh_go_record_add_tag(c.raw, cstr(tag), C.size_t(len(tag))) }

// SetMeta sets a meta_data entry of the record.
func (c *Call) SetMeta(k, v string) {
	C.gh_go_record_set_meta(c.raw, cstr(k), C.size_t(len(k)), cstr(v), C.size_t(len(v)))
}
