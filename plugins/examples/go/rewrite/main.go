// Rewrites the request before it reaches the upstream: method, path and query, a header
// removed, and a response header for the client; its body; and the response's status.
package main

import (
	"bytes"
	"io"
	"net/http"
	"strconv"
	"strings"
)

func Rewrite(rw http.ResponseWriter, r *http.Request) {
	r.Method = http.MethodPost
	r.URL.Path = strings.Replace(r.URL.Path, "/old/", "/new/", 1)
	q := r.URL.Query()
	q.Set("rewritten", "yes")
	r.URL.RawQuery = q.Encode()
	r.Header.Del("X-Secret")
	rw.Header().Set("X-Rewritten-By", "go")
}

func main() {}

// Upcase replaces the request body with its upper-case form.
func Upcase(rw http.ResponseWriter, r *http.Request) {
	b, err := io.ReadAll(r.Body)
	if err != nil {
		rw.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(bytes.ToUpper(b)))
}

// Accepted answers 202 whatever the upstream said, and says what it said.
func Accepted(rw http.ResponseWriter, res *http.Response, req *http.Request) {
	res.Header.Set("X-Upstream-Status", strconv.Itoa(res.StatusCode))
	res.StatusCode = http.StatusAccepted
}
