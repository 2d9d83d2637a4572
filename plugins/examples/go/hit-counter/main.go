package main

import (
	"encoding/json"
	"net/http"
	"sync"

	"gatehouse.dev/go/ctx"
	"gatehouse.dev/go/log"
	"gatehouse.dev/go/user"
)

var logger = log.Get()

// plugin exported functionality
func MyProcessRequest(rw http.ResponseWriter, r *http.Request) {
	endPoint := r.Method + " " + r.URL.Path
	logger.Info("Custom middleware, new hit:", endPoint)

	hitCounter := recordHit(endPoint)
	logger.Debug("New hit counter value:", hitCounter)

	if hitCounter > 100 {
		logger.Warning("Hit counter to high")
	}

	reply := myReply{
		Session:    ctx.GetSession(r),
		Endpoint:   endPoint,
		HitCounter: hitCounter,
	}

	jsonData, err := json.Marshal(reply)
	if err != nil {
		logger.Error(err.Error())
		rw.WriteHeader(http.StatusInternalServerError)
		return
	}

	rw.Header().Set("Content-Type", "application/json")
	rw.WriteHeader(http.StatusOK)
	rw.Write(jsonData)
}

// called once plugin is loaded, this is where we put all initialisation work for plugin
// i.e. setting exported functions, setting up connection pool to storage and etc.
func init() {
	hitCounter = make(map[string]uint64)
}

// plugin internal state and implementation
var (
	hitCounter   map[string]uint64
	hitCounterMu sync.Mutex
)

func recordHit(endpoint string) uint64 {
	hitCounterMu.Lock()
	defer hitCounterMu.Unlock()
	hitCounter[endpoint]++
	return hitCounter[endpoint]
}

type myReply struct {
	Session    *user.SessionState `json:"session"`
	Endpoint   string             `json:"endpoint"`
	HitCounter uint64             `json:"hit_counter"`
}

func main() {}
