package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// examples is the module of the ported Tyk examples.
var examples = filepath.Join("..", "..", "..", "examples", "go")

func hooksOf(p *pkg) map[string]hookKind {
	m := map[string]hookKind{}
	for _, h := range p.hooks {
		m[h.name] = h.kind
	}
	return m
}

func TestThePortedExamplesArePlanned(t *testing.T) {
	dirs := []string{"hit-counter", "api-name", "session-meta", "response-rewrite", "faulty", "mask-analytics"}
	var paths []string
	for _, d := range dirs {
		paths = append(paths, filepath.Join(examples, d))
	}
	b, err := plan(paths, nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.modPath != "gatehouse.dev/examples" {
		t.Errorf("module %q", b.modPath)
	}
	byDir := map[string]*pkg{}
	for _, p := range b.pkgs {
		byDir[p.base] = p
	}
	if got := hooksOf(byDir["hit-counter"]); got["MyProcessRequest"] != request || len(got) != 1 {
		t.Errorf("hit-counter hooks %v", got)
	}
	if byDir["hit-counter"].inits != 1 {
		t.Errorf("hit-counter's init not found")
	}
	if got := hooksOf(byDir["response-rewrite"]); got["MyPluginResponse"] != response {
		t.Errorf("response-rewrite hooks %v", got)
	}
	if got := hooksOf(byDir["mask-analytics"]); got["MaskAnalyticsData"] != analytics {
		t.Errorf("mask-analytics hooks %v", got)
	}
	// res.Body is only assigned there; faulty's Echo reads r.Body.
	if byDir["response-rewrite"].readsBody || !byDir["faulty"].readsBody || byDir["hit-counter"].readsBody {
		t.Errorf("body readers: response-rewrite %v, faulty %v, hit-counter %v",
			byDir["response-rewrite"].readsBody, byDir["faulty"].readsBody, byDir["hit-counter"].readsBody)
	}
	// Two packages export MyPluginFunction: only the long names; one exports MyProcessRequest.
	if got := b.names(byDir["api-name"], hook{"MyPluginFunction", request}); strings.Join(got, " ") != "api-name.MyPluginFunction" {
		t.Errorf("api-name names %v", got)
	}
	if got := b.names(byDir["hit-counter"], hook{"MyProcessRequest", request}); strings.Join(got, " ") != "MyProcessRequest hit-counter.MyProcessRequest" {
		t.Errorf("hit-counter names %v", got)
	}
}

func TestTheRewrittenSourceIsAPackageWithItsInitExported(t *testing.T) {
	b, err := plan([]string{filepath.Join(examples, "hit-counter")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	src := string(b.pkgs[0].files[0].src)
	if !strings.HasPrefix(src, "package plugin_hit_counter\n") {
		t.Errorf("package clause not rewritten:\n%.80s", src)
	}
	if !strings.Contains(src, "func GatehouseInit0() {") || strings.Contains(src, "func init()") {
		t.Errorf("init not rewritten")
	}
}

func TestBuildTagsChooseFiles(t *testing.T) {
	for tags, want := range map[string]string{"": "v1.go", "v2": "v2.go"} {
		b, err := plan([]string{filepath.Join(examples, "version")}, splitTags(tags))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, f := range b.pkgs[0].files {
			names = append(names, f.name)
		}
		if strings.Join(names, " ") != want+" version.go" {
			t.Errorf("tags %q: files %v", tags, names)
		}
	}
}

func TestWhatCannotBeBuiltIsSaid(t *testing.T) {
	tmp := t.TempDir()
	write := func(rel, text string) string {
		p := filepath.Join(tmp, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return filepath.Dir(p)
	}
	write("m/go.mod", "module example.com/m\n\ngo 1.21\n")
	lib := write("m/lib/lib.go", "package lib\n\nfunc F() {}\n")
	none := write("m/none/main.go", "package main\n\nfunc Helper(s string) {}\n\nfunc main() {}\n")
	ok := write("m/ok/main.go", "package main\n\nimport \"net/http\"\n\nfunc H(w http.ResponseWriter, r *http.Request) {}\n\nfunc main() {}\n")
	write("n/go.mod", "module example.com/n\n\ngo 1.21\n\nrequire gatehouse.dev/go v0.0.0\n")
	other := write("n/ok/main.go", "package main\n\nimport \"net/http\"\n\nfunc H(w http.ResponseWriter, r *http.Request) {}\n\nfunc main() {}\n")
	tyk := write("m/tyk/main.go", "package main\n\nimport (\n\t\"net/http\"\n\n\t\"github.com/TykTechnologies/tyk/ctx\"\n)\n\nfunc H(w http.ResponseWriter, r *http.Request) { ctx.GetSession(r) }\n\nfunc main() {}\n")
	outside := write("loose/main.go", "package main\n")
	for _, c := range []struct {
		dirs []string
		want string
	}{
		{[]string{lib}, "is package lib: a plugin is a package main"},
		{[]string{none}, "exports no hook"},
		{[]string{ok}, "does not require gatehouse.dev/go"},
		{[]string{ok, other}, "put the plugins of one bundle in one module"},
		{[]string{outside}, "not inside a Go module"},
		{[]string{tyk}, "imports github.com/TykTechnologies/tyk/ctx: import gatehouse.dev/go/ctx instead"},
		{[]string{ok, filepath.Join(tmp, "m", "ok")}, "are both named ok"},
	} {
		_, err := plan(c.dirs, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: got %v, want %q", c.dirs, err, c.want)
		}
	}
}
