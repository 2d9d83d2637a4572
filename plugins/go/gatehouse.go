// Package gatehouse is what a bundle built by gatehouse-go registers its hooks with, and
// helpers for plugin code. Plugins themselves import ctx, log, user and apidef, as Tyk
// plugins do.
package gatehouse

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"runtime/debug"
	"strconv"
	"time"

	"gatehouse.dev/go/analytics"
	"gatehouse.dev/go/internal/host"
)

// Request registers a request hook (pre, authCheck, postKeyAuth, post) under name.
// body: the hook reads r.Body, so the gateway buffers the request body for it.
func Request(name string, f func(http.ResponseWriter, *http.Request), body bool) {
	host.RegisterRequest(name, f, body)
}

// Response registers a response hook; body: it reads res.Body.
func Response(name string, f func(http.ResponseWriter, *http.Response, *http.Request), body bool) {
	host.RegisterResponse(name, f, body)
}

// Init registers a package's init function, run once when the gateway loads the bundle.
func Init(pkg string, f func()) { host.OnInit(pkg, f) }

// Go runs f in a new goroutine that recovers its own panic and logs it. A panic in a
// goroutine nobody recovers ends the whole process, the gateway with it: start
// background work with Go, or recover in the goroutine yourself.
func Go(f func()) {
	go func() {
		defer func() {
			if p := recover(); p != nil {
				host.Log(host.LevelError, fmt.Sprintf("goroutine started with gatehouse.Go panicked: %v\n%s", p, debug.Stack()))
			}
		}()
		f()
	}()
}

// Analytics registers an analytics hook, Tyk's func(*analytics.AnalyticsRecord).
func Analytics(name string, f func(*analytics.AnalyticsRecord)) {
	host.RegisterAnalytics(name, func(c *host.Call) {
		rec := readRecord(c)
		before := *rec
		before.Tags = nil
		f(rec)
		writeRecord(c, &before, rec)
	})
}

func readRecord(c *host.Call) *analytics.AnalyticsRecord {
	get := func(name string) string { v, _ := c.Field(name); return v }
	num := func(name string) int64 { n, _ := strconv.ParseInt(get(name), 10, 64); return n }
	b64 := func(name string) string {
		if v, ok := c.Field(name); ok {
			return base64.StdEncoding.EncodeToString([]byte(v))
		}
		return ""
	}
	r := &analytics.AnalyticsRecord{
		Method:        get("method"),
		Path:          get("path"),
		ContentLength: num("request_bytes"),
		ResponseCode:  int(num("status")),
		APIKey:        get("key_id"),
		APIName:       get("api_name"),
		APIID:         get("api_id"),
		RequestTime:   num("latency_total_ms"),
		Latency:       analytics.Latency{Total: num("latency_total_ms"), Upstream: num("latency_upstream_ms")},
		RawRequest:    b64("request_body"),
		RawResponse:   b64("response_body"),
		IPAddress:     get("client_ip"),
		Alias:         get("key_alias"),
	}
	r.TimeStamp, _ = time.Parse(time.RFC3339Nano, get("time"))
	return r
}

func writeRecord(c *host.Call, before, after *analytics.AnalyticsRecord) {
	set := func(name, old, now string) {
		if old != now {
			if now == "" {
				c.DropField(name)
			} else {
				c.SetField(name, now)
			}
		}
	}
	set("method", before.Method, after.Method)
	set("path", before.Path, after.Path)
	set("api_name", before.APIName, after.APIName)
	set("key_id", before.APIKey, after.APIKey)
	set("key_alias", before.Alias, after.Alias)
	set("client_ip", before.IPAddress, after.IPAddress)
	if before.ResponseCode != after.ResponseCode {
		c.SetField("status", strconv.Itoa(after.ResponseCode))
	}
	body := func(name, old, now string) {
		if old == now {
			return
		}
		raw, err := base64.StdEncoding.DecodeString(now)
		if err != nil {
			raw = []byte(now)
		}
		set(name, "-", string(raw))
	}
	body("request_body", before.RawRequest, after.RawRequest)
	body("response_body", before.RawResponse, after.RawResponse)
	for _, t := range after.Tags {
		c.AddTag(t)
	}
}
