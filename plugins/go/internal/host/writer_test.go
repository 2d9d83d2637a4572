package host

import (
	"errors"
	"net/http"
	"testing"
)

func TestHeadersChangedAfterWriteHeaderAreNotSent(t *testing.T) {
	w := writer{h: http.Header{}}
	w.reset()
	w.Header().Set("A", "1")
	if _, err := w.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	w.Header().Set("B", "2")
	w.WriteHeader(http.StatusTeapot)
	if w.status != http.StatusOK || !w.wrote {
		t.Errorf("status %d, wrote %v: the first Write sends 200", w.status, w.wrote)
	}
	if w.sent.Get("A") != "1" || w.sent.Get("B") != "" {
		t.Errorf("sent headers %v", w.sent)
	}
	w.reset()
	if w.wrote || w.sent != nil || len(w.h) != 0 || len(w.body) != 0 {
		t.Errorf("not reset: %+v", w)
	}
}

func TestABodyKeptPastItsHookFails(t *testing.T) {
	b := newBody(nil, targetRequest)
	expire(b)
	if _, err := b.Read(make([]byte, 8)); !errors.Is(err, errAfterHook) {
		t.Errorf("read after the hook: %v", err)
	}
	expire(nil) // a call without that body
}
