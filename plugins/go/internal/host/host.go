// Package host is the Go side of the plugin ABI: the hooks a bundle registers, the entry
// points the gateway calls, and the per-call state that ctx, log and the hook signatures
// read and write. Every entry point recovers panics: a Go panic becomes a 500 for that
// request, never a crash of the gateway.
package host

/*
#cgo CFLAGS: -O2 -Wall
#include <stdlib.h>
#include "bridge.h"
*/
import "C"

import (
	"context"
	"fmt"
	"net/http"
	"runtime/debug"
	"sync"
	"unsafe"
)

// Kind is the signature a hook was registered with.
type Kind int

const (
	// Request hooks: func(http.ResponseWriter, *http.Request), for pre, authCheck,
	// postKeyAuth and post.
	Request Kind = iota
	// Response hooks: func(http.ResponseWriter, *http.Response, *http.Request).
	Response
	// Analytics hooks: run on each analytics record of the API.
	Analytics
)

// Level is a log level, as the gateway numbers them.
type Level int

// Log levels.
const (
	LevelError Level = 1
	LevelWarn  Level = 2
	LevelInfo  Level = 3
	LevelDebug Level = 4
)

type entry struct {
	name      string
	kind      Kind
	body      bool
	request   func(http.ResponseWriter, *http.Request)
	response  func(http.ResponseWriter, *http.Response, *http.Request)
	analytics func(*Call)
	table     *C.gh_hook
	warned    sync.Once
}

type initFunc struct {
	pkg string
	f   func()
}

// The registry is written only by package initialisers (the generated bundle's main
// package), which the Go runtime finishes before any exported function runs; afterwards it
// is only read.
var (
	entries []*entry
	byName  = map[string]*entry{}
	inits   []initFunc
	tableMu sync.Mutex
)

// registerErr is the first registration that went wrong, reported by init: a panic in a
// package initialiser would end the gateway's process while it loads the library.
var registerErr string

func register(e *entry) {
	if _, dup := byName[e.name]; dup && registerErr == "" {
		registerErr = fmt.Sprintf("hook %q registered twice", e.name)
	}
	if len(entries) >= C.GH_GO_MAX_HOOKS && registerErr == "" {
		registerErr = fmt.Sprintf("more than %d hooks in one bundle", C.GH_GO_MAX_HOOKS)
	}
	if registerErr != "" {
		return
	}
	entries = append(entries, e)
	byName[e.name] = e
}

// RegisterRequest registers a request hook under name; body asks the gateway to buffer the
// request body so the hook can read r.Body.
func RegisterRequest(name string, f func(http.ResponseWriter, *http.Request), body bool) {
	register(&entry{name: name, kind: Request, body: body, request: f})
}

// RegisterResponse registers a response hook; body asks for the upstream response's body.
func RegisterResponse(name string, f func(http.ResponseWriter, *http.Response, *http.Request), body bool) {
	register(&entry{name: name, kind: Response, body: body, response: f})
}

// RegisterAnalytics registers an analytics hook, which reads and edits records through
// the Call's Record methods.
func RegisterAnalytics(name string, f func(*Call)) {
	register(&entry{name: name, kind: Analytics, analytics: f})
}

// OnInit adds a package's init function, run once when the gateway loads the bundle,
// before any hook. A panic in it refuses the load with the panic's message.
func OnInit(pkg string, f func()) { inits = append(inits, initFunc{pkg, f}) }

//export ghgoInit
func ghgoInit(err *C.gh_buf) (rc C.int32_t) {
	if registerErr != "" {
		fill(err, registerErr)
		return 1
	}
	for _, in := range inits {
		if msg := runInit(in); msg != "" {
			fill(err, msg)
			return 1
		}
	}
	return 0
}

func runInit(in initFunc) (msg string) {
	defer func() {
		if p := recover(); p != nil {
			msg = fmt.Sprintf("init of Go package %s panicked: %v", in.pkg, p)
		}
	}()
	in.f()
	return ""
}

func fill(buf *C.gh_buf, msg string) {
	n := len(msg)
	if n > int(buf.cap) {
		n = int(buf.cap)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(buf.ptr)), n), msg)
	buf.len = C.size_t(n)
}

//export ghgoFindHook
func ghgoFindHook(name *C.char, n C.size_t) (t *C.gh_hook) {
	defer func() {
		if p := recover(); p != nil {
			t = nil
		}
	}()
	e, ok := byName[C.GoStringN(name, C.int(n))]
	if !ok {
		return nil
	}
	tableMu.Lock()
	defer tableMu.Unlock()
	if e.table == nil {
		var flags C.uint32_t
		if e.body && e.kind == Request {
			flags |= C.GH_HOOK_REQUEST_BODY
		}
		if e.body && e.kind == Response {
			flags |= C.GH_HOOK_RESPONSE_BODY
		}
		var index int
		for i, x := range entries {
			if x == e {
				index = i
			}
		}
		b := func(k Kind) C.int {
			if e.kind == k {
				return 1
			}
			return 0
		}
		e.table = C.gh_go_table(C.uint32_t(index), flags, b(Request), b(Response), b(Analytics))
	}
	return e.table
}

//export ghgoQuiesce
func ghgoQuiesce() {}

func entryAt(instance C.uintptr_t) *entry {
	i := int(instance) - 1
	if i < 0 || i >= len(entries) {
		return nil
	}
	return entries[i]
}

//export ghgoOnRequest
func ghgoOnRequest(instance C.uintptr_t, raw *C.gh_call) C.gh_status {
	return enter(instance, raw, Request, func(e *entry, c *Call) C.gh_status {
		c.loadRequest()
		e.request(&c.rw, c.req)
		return c.finishRequest()
	})
}

//export ghgoOnResponse
func ghgoOnResponse(instance C.uintptr_t, raw *C.gh_call) C.gh_status {
	return enter(instance, raw, Response, func(e *entry, c *Call) C.gh_status {
		c.loadRequest()
		c.loadResponse()
		e.response(&c.rw, c.res, c.req)
		return c.finishResponse()
	})
}

//export ghgoOnAnalytics
func ghgoOnAnalytics(instance C.uintptr_t, raw *C.gh_call) C.gh_status {
	return enter(instance, raw, Analytics, func(e *entry, c *Call) C.gh_status {
		e.analytics(c)
		return C.GH_CONTINUE
	})
}

// enter runs one hook call of the given kind with a pooled Call, turning a panic into
// GH_PANIC (and a log line with its stack).
func enter(instance C.uintptr_t, raw *C.gh_call, kind Kind, run func(*entry, *Call) C.gh_status) (status C.gh_status) {
	e := entryAt(instance)
	if e == nil || e.kind != kind {
		return C.GH_ERROR
	}
	c := getCall(raw, e)
	done := false
	defer func() {
		// `done` also catches panic(nil), which recover reports as nil under
		// GODEBUG=panicnil=1 (the default for modules older than Go 1.21).
		if p := recover(); p != nil || !done {
			status = panicked(raw, e, p)
		}
		putCall(c)
	}()
	status = run(e, c)
	done = true
	return status
}

func panicked(raw *C.gh_call, e *entry, p any) C.gh_status {
	msg := fmt.Sprintf("Go hook %s panicked: %v", e.name, p)
	logTo(raw, LevelError, msg+"\n"+string(debug.Stack()))
	C.gh_go_set_error(raw, cstr(msg), C.size_t(len(msg)))
	return C.GH_PANIC
}

// Log writes msg to the gateway's log, tagged with the API, plugin and hook of the call
// running on this thread (none outside a hook).
func Log(level Level, msg string) {
	if sink != nil {
		sink(level, msg)
		return
	}
	logTo(C.gh_go_current(), level, msg)
}

// sink replaces the gateway's log in the SDK's own tests, which run without a gateway.
var sink func(Level, string)

// SetLogSink sends log lines to f until the returned function is called. For tests.
func SetLogSink(f func(Level, string)) (restore func()) {
	sink = f
	return func() { sink = nil }
}

func logTo(raw *C.gh_call, level Level, msg string) {
	C.gh_go_log(raw, C.gh_level(level), cstr(msg), C.size_t(len(msg)))
}

// cstr points C at a Go string's bytes for the duration of one call; the host copies them.
func cstr(s string) *C.char {
	if len(s) == 0 {
		return nil
	}
	return (*C.char)(unsafe.Pointer(unsafe.StringData(s)))
}

func cbytes(b []byte) *C.char {
	if len(b) == 0 {
		return nil
	}
	return (*C.char)(unsafe.Pointer(&b[0]))
}

func gostr(s C.gh_str) string {
	if s.len == 0 {
		return ""
	}
	return C.GoStringN((*C.char)(unsafe.Pointer(s.ptr)), C.int(s.len))
}

// view is the host's bytes without a copy: valid only while the hook runs.
func view(s C.gh_str) []byte {
	if s.len == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(s.ptr)), int(s.len))
}

// ---------------------------------------------------------------- per-call state

type ctxKey struct{}

// callCtx is the context of every request a hook sees: it finds the Call behind an
// *http.Request (ctx.GetSession and friends), also through contexts derived from it.
type callCtx struct {
	context.Context
	c *Call
}

func (k *callCtx) Value(key any) any {
	if key == (ctxKey{}) {
		return k.c
	}
	return k.Context.Value(key)
}

// CallOf returns the hook call behind r, or nil when r is not a request the gateway
// passed to a hook that is still running.
func CallOf(r *http.Request) *Call {
	if r == nil {
		return nil
	}
	c, _ := r.Context().Value(ctxKey{}).(*Call)
	if c == nil || c.raw == nil {
		return nil
	}
	return c
}

var calls = sync.Pool{New: func() any { return newCall() }}

func getCall(raw *C.gh_call, e *entry) *Call {
	c := calls.Get().(*Call)
	c.raw, c.entry = raw, e
	return c
}

func putCall(c *Call) {
	c.raw, c.entry, c.responding = nil, nil, false
	expire(c.reqBody)
	expire(c.resBody)
	c.reqBody, c.resBody, c.Session, c.Definition = nil, nil, nil, nil
	calls.Put(c)
}
