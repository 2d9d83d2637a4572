package log

import (
	"errors"
	"testing"

	"gatehouse.dev/go/internal/host"
)

func TestLinesAreFormattedAsLogrusDoes(t *testing.T) {
	var got []string
	restore := host.SetLogSink(func(level host.Level, msg string) { got = append(got, msg) })
	defer restore()
	l := Get()
	l.Info("Custom middleware, new hit:", "GET /x")
	l.Infoln("a", "b")
	l.Infof("%d hits", 3)
	l.WithField("b", 2).WithFields(Fields{"a": 1}).WithError(errors.New("x")).Warning("w")
	want := []string{"Custom middleware, new hit:GET /x", "a b", "3 hits", "w a=1 b=2 error=x"}
	if len(got) != len(want) {
		t.Fatalf("got %q", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("line %d: got %q, want %q", i, got[i], want[i])
		}
	}
}

func TestPanicLogsThenPanicsAndFatalDoesNotExit(t *testing.T) {
	var n int
	restore := host.SetLogSink(func(host.Level, string) { n++ })
	defer restore()
	Get().Fatal("still running")
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Panic did not panic")
			}
		}()
		Get().Panic("p")
	}()
	if n != 2 {
		t.Errorf("%d lines", n)
	}
}
