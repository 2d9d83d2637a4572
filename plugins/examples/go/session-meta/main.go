package main

import (
	"fmt"
	"net/http"

	"gatehouse.dev/go/ctx"
)

func main() {}
func MyPluginFunction(w http.ResponseWriter, r *http.Request) {
	session := ctx.GetSession(r)
	fmt.Println("Developer ID:", session.MetaData["tyk_developer_id"])
	fmt.Println("Developer Email:", session.MetaData["tyk_developer_email"])
}
