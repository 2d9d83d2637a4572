package main

import (
	"net/http"

	"gatehouse.dev/go/log"
)

var logger = log.Get()

// AddFooBarHeader adds custom "Foo: Bar" header to the request
func AddFooBarHeader(rw http.ResponseWriter, r *http.Request) {
	logger.Info("Processing HTTP request in Golang plugin!!")
	r.Header.Add("Foo", "Bar")
}

func main() {}
