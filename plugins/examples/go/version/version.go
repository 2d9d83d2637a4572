// Says which build of the bundle answered, to show a reload: built as v1, or as v2 with
// `-tags v2`.
package main

import "net/http"

func AddVersion(rw http.ResponseWriter, r *http.Request) {
	r.Header.Set("X-Go-Version", version)
}

func main() {}
