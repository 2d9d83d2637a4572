package host

import (
	"bytes"
	"os"
	"testing"
)

// The SDK builds against its own copy of the ABI header (a module carries no files from
// outside it); it must be the gateway's.
func TestTheHeaderIsTheGatewaysOwn(t *testing.T) {
	ours, err := os.ReadFile("gatehouse_plugin.h")
	if err != nil {
		t.Fatal(err)
	}
	theirs, err := os.ReadFile("../../../sdk/include/gatehouse_plugin.h")
	if err != nil {
		t.Skip("not inside the Gatehouse repository:", err)
	}
	if !bytes.Equal(ours, theirs) {
		t.Fatal("plugins/go/internal/host/gatehouse_plugin.h differs from plugins/sdk/include/gatehouse_plugin.h: copy it again")
	}
}
