package main

import (
	"bytes"
	"io/ioutil"
	"net/http"
)

// MyPluginResponse intercepts response from upstream
func MyPluginResponse(rw http.ResponseWriter, res *http.Response, req *http.Request) {
	// add a header to our response object
	res.Header.Add("X-Response-Added", "resp-added")

	// overwrite our response body
	var buf bytes.Buffer
	buf.Write([]byte(`{"message":"Hi! I'm a response plugin"}`))
	res.Body = ioutil.NopCloser(&buf)

}

func main() {}
