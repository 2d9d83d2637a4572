// A plugin whose init panics: the gateway refuses the library and says why.
package main

import "net/http"

func init() {
	panic("cannot reach the license server")
}

func Never(rw http.ResponseWriter, r *http.Request) {}

func main() {}
