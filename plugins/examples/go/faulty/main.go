// Hooks that panic, to show the gateway answers 500 and keeps serving.
package main

import (
	"net/http"
	"strings"

	gatehouse "gatehouse.dev/go"
)

func PanicOnRequest(rw http.ResponseWriter, r *http.Request) {
	if strings.Contains(r.URL.RawQuery, "panic") {
		panic("boom in a request hook")
	}
}

func PanicOnResponse(rw http.ResponseWriter, res *http.Response, req *http.Request) {
	if strings.Contains(req.URL.RawQuery, "panic") {
		panic("boom in a response hook")
	}
}

// PanicLater panics in a goroutine started with gatehouse.Go, which recovers it: the
// request is answered as usual and the gateway keeps running.
func PanicLater(rw http.ResponseWriter, r *http.Request) {
	gatehouse.Go(func() { panic("boom in a goroutine") })
}

// Echo answers with the request body it read, so the body path is checked too.
func Echo(rw http.ResponseWriter, r *http.Request) {
	var b strings.Builder
	buf := make([]byte, 4096)
	for {
		n, err := r.Body.Read(buf)
		b.Write(buf[:n])
		if err != nil {
			break
		}
	}
	rw.Header().Set("Content-Type", "text/plain")
	rw.Write([]byte("echo: " + b.String()))
}

func main() {}
