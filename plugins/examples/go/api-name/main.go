package main

import (
	"fmt"
	"net/http"

	"gatehouse.dev/go/ctx"
)

func MyPluginFunction(w http.ResponseWriter, r *http.Request) {
	apidef := ctx.GetDefinition(r)
	fmt.Println("API name is", apidef.Name)
}

func main() {}
