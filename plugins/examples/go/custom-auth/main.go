// A custom auth hook (authCheck) in Tyk's style: it checks the token itself and gives the
// request a session, whose rate limit the gateway then enforces.
package main

import (
	"net/http"

	"gatehouse.dev/go/ctx"
	"gatehouse.dev/go/user"
)

var tokens = map[string]string{"t1": "user-1", "t2": "user-2"}

func MyAuthCheck(rw http.ResponseWriter, r *http.Request) {
	token := r.Header.Get("Authorization")
	owner, ok := tokens[token]
	if !ok {
		rw.WriteHeader(http.StatusUnauthorized)
		rw.Write([]byte(`{"error":"not authorised"}`))
		return
	}
	ctx.SetSession(r, &user.SessionState{
		KeyID:    token,
		Alias:    owner,
		Rate:     2,
		Per:      3600,
		QuotaMax: -1,
		MetaData: map[string]interface{}{"owner": owner},
	}, true)
}

func main() {}
