// Rewrites the request before it reaches the upstream: method, path and query, a header
// removed, and a response header for the client.
package main

import (
	"net/http"
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
