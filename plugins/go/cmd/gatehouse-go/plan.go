package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// genDir is where, inside the plugins' module, the overlay puts the generated main
// package; pkgDir, inside each plugin directory, its importable copy (inside the directory,
// so the plugin's imports of `internal` packages stay allowed).
const (
	genDir = "gatehouse_bundle"
	pkgDir = "gatehouse_pkg"
)

type hookKind string

const (
	request   hookKind = "request"
	response  hookKind = "response"
	analytics hookKind = "analytics"
)

type hook struct {
	name string
	kind hookKind
}

type edit struct {
	off, end int
	text     string
}

type srcFile struct {
	name string
	src  []byte // rewritten Go source, or nil for a file taken as it is
	path string // the original file
}

// pkg is one plugin directory, turned into an importable package.
type pkg struct {
	dir       string // as given
	abs       string
	path      string // the generated package's import path
	base      string // the directory's name, the prefix of its hooks' long names
	name      string // the generated package's name
	files     []srcFile
	hooks     []hook
	inits     int
	readsBody bool
}

type bundle struct {
	modRoot, modPath, genDir string
	pkgs                     []*pkg
	// How many packages export each hook name.
	count map[string]int
}

// bodyReaders are the selectors that read a request's or response's body; a package using
// any gets its bodies buffered by the gateway.
var bodyReaders = map[string]bool{
	"Body": true, "GetBody": true, "ParseForm": true, "ParseMultipartForm": true, "FormValue": true,
	"PostFormValue": true, "FormFile": true, "MultipartReader": true,
	"DumpRequest": true, "DumpRequestOut": true, "DumpResponse": true,
}

// tykPackages are the Tyk packages a plugin imports, and what replaces each.
var tykPackages = map[string]string{
	"github.com/TykTechnologies/tyk/ctx":            "gatehouse.dev/go/ctx",
	"github.com/TykTechnologies/tyk/log":            "gatehouse.dev/go/log",
	"github.com/TykTechnologies/tyk/user":           "gatehouse.dev/go/user",
	"github.com/TykTechnologies/tyk/apidef":         "gatehouse.dev/go/apidef",
	"github.com/TykTechnologies/tyk/apidef/oas":     "gatehouse.dev/go/apidef/oas",
	"github.com/TykTechnologies/tyk-pump/analytics": "gatehouse.dev/go/analytics",
}

func plan(dirs []string, tags []string) (*bundle, error) {
	b := &bundle{genDir: genDir, count: map[string]int{}}
	var abss []string
	for _, d := range dirs {
		abs, err := filepath.Abs(d)
		if err != nil {
			return nil, err
		}
		root, err := moduleRoot(abs)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", d, err)
		}
		if b.modRoot == "" {
			b.modRoot = root
		} else if root != b.modRoot {
			return nil, fmt.Errorf("%s is in the Go module at %s, the others in %s: put the plugins of one bundle in one module", d, root, b.modRoot)
		}
		abss = append(abss, abs)
	}
	gomod, err := os.ReadFile(filepath.Join(b.modRoot, "go.mod"))
	if err != nil {
		return nil, err
	}
	b.modPath = modulePath(gomod)
	if b.modPath == "" {
		return nil, fmt.Errorf("%s/go.mod has no module line", b.modRoot)
	}
	listed, err := goList(b.modRoot, abss, tags)
	if err != nil {
		return nil, err
	}
	bases := map[string]string{}
	for i, d := range dirs {
		lp, ok := listed[abss[i]]
		if !ok {
			return nil, fmt.Errorf("%s: go list did not report it", d)
		}
		p, err := load(d, abss[i], lp)
		if err != nil {
			return nil, err
		}
		if other, dup := bases[p.base]; dup {
			return nil, fmt.Errorf("%s and %s are both named %s, so their hooks' long names (%s.<Name>) would clash: rename one", other, d, p.base, p.base)
		}
		bases[p.base] = d
		rel, err := filepath.Rel(b.modRoot, p.abs)
		if err != nil {
			return nil, err
		}
		p.path = strings.TrimSuffix(b.modPath+"/"+filepath.ToSlash(rel), "/.") + "/" + pkgDir
		if _, err := os.Stat(filepath.Join(p.abs, pkgDir)); err == nil {
			return nil, fmt.Errorf("%s/%s exists: gatehouse-go generates a package of that name; move it away", d, pkgDir)
		}
		for _, h := range p.hooks {
			b.count[h.name]++
		}
		b.pkgs = append(b.pkgs, p)
	}
	if !bytes.Contains(gomod, []byte("gatehouse.dev/go")) {
		return nil, fmt.Errorf("the module %s (%s/go.mod) does not require gatehouse.dev/go: run `go get gatehouse.dev/go` there (or add a require and a replace directive pointing at a copy of plugins/go)", b.modPath, b.modRoot)
	}
	if _, err := os.Stat(filepath.Join(b.modRoot, genDir)); err == nil {
		return nil, fmt.Errorf("%s/%s exists: gatehouse-go generates a package of that name; move it away", b.modRoot, genDir)
	}
	return b, nil
}

// listedPkg is what `go list -json` says of a package: the files the build would use.
type listedPkg struct {
	Dir, Name                                                                  string
	GoFiles, CgoFiles, CFiles, HFiles, SFiles, CXXFiles, SysoFiles, EmbedFiles []string
	Error                                                                      *struct{ Err string }
}

// goList asks the go command that will build the bundle which files each directory's
// package is made of, with the build's tags and cgo on: the files, release tags and
// embedded files are the ones the build sees.
func goList(modRoot string, dirs []string, tags []string) (map[string]listedPkg, error) {
	args := []string{"list", "-e", "-json"}
	if len(tags) > 0 {
		args = append(args, "-tags", strings.Join(tags, ","))
	}
	cmd := exec.Command("go", append(args, dirs...)...)
	cmd.Dir = modRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list: %v: %s", err, strings.TrimSpace(stderr.String()))
	}
	got := map[string]listedPkg{}
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var p listedPkg
		if err := dec.Decode(&p); err != nil {
			return nil, fmt.Errorf("go list: %w", err)
		}
		got[p.Dir] = p
	}
	return got, nil
}

func moduleRoot(dir string) (string, error) {
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("not inside a Go module (no go.mod in it or above it)")
		}
	}
}

func modulePath(gomod []byte) string {
	for _, line := range strings.Split(string(gomod), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "module" {
			if p, err := strconv.Unquote(f[1]); err == nil {
				return p
			}
			return f[1]
		}
	}
	return ""
}

// load reads a plugin directory: its files (as go list chose them), its hooks and init
// functions.
func load(dir, abs string, lp listedPkg) (*pkg, error) {
	if lp.Error != nil {
		return nil, fmt.Errorf("%s: %s", dir, lp.Error.Err)
	}
	if lp.Name != "main" {
		return nil, fmt.Errorf("%s is package %s: a plugin is a package main, as Tyk builds them", dir, lp.Name)
	}
	p := &pkg{dir: dir, abs: abs, base: filepath.Base(abs), name: packageName(filepath.Base(abs))}
	fset := token.NewFileSet()
	gofiles := append(append([]string{}, lp.GoFiles...), lp.CgoFiles...)
	sort.Strings(gofiles)
	for _, name := range gofiles {
		path := filepath.Join(abs, name)
		src, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		f, err := parser.ParseFile(fset, path, src, parser.ParseComments)
		if err != nil {
			return nil, err
		}
		out, err := p.rewrite(fset, f, src)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", filepath.Join(dir, name), err)
		}
		p.files = append(p.files, srcFile{name: name, src: out, path: path})
	}
	for _, list := range [][]string{lp.CFiles, lp.HFiles, lp.SFiles, lp.CXXFiles, lp.SysoFiles, lp.EmbedFiles} {
		for _, name := range list {
			p.files = append(p.files, srcFile{name: name, path: filepath.Join(abs, name)})
		}
	}
	if len(p.hooks) == 0 {
		return nil, fmt.Errorf("%s exports no hook: Gatehouse calls exported functions of the form func(http.ResponseWriter, *http.Request), func(http.ResponseWriter, *http.Response, *http.Request) or func(*analytics.AnalyticsRecord)", dir)
	}
	return p, nil
}

// packageName turns a directory name into a Go package name.
func packageName(dir string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(dir) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteRune('_')
		}
	}
	return "plugin_" + b.String()
}

// rewrite makes a plugin file part of an importable package: `package main` becomes the
// package's own name, and each `func init` an exported function the bundle calls when the
// gateway loads it (so a panic in it refuses the load instead of killing the process).
func (p *pkg) rewrite(fset *token.FileSet, f *ast.File, src []byte) ([]byte, error) {
	off := func(pos token.Pos) int { return fset.Position(pos).Offset }
	edits := []edit{{off(f.Name.Pos()), off(f.Name.End()), p.name}}
	httpName, analyticsName := "", ""
	for _, imp := range f.Imports {
		path, _ := strconv.Unquote(imp.Path.Value)
		name := ""
		if imp.Name != nil {
			name = imp.Name.Name
		}
		if ours, ok := tykPackages[path]; ok {
			return nil, fmt.Errorf("imports %s: import %s instead", path, ours)
		}
		if strings.HasPrefix(path, "github.com/TykTechnologies/") {
			return nil, fmt.Errorf("imports %s, a part of Tyk that Gatehouse does not provide (docs/go-plugins.md lists what it does)", path)
		}
		switch path {
		case "net/http":
			httpName = or(name, "http")
		case "gatehouse.dev/go/analytics":
			analyticsName = or(name, "analytics")
		}
	}
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok || fn.Recv != nil {
			continue
		}
		if fn.Name.Name == "init" {
			edits = append(edits, edit{off(fn.Name.Pos()), off(fn.Name.End()), fmt.Sprintf("GatehouseInit%d", p.inits)})
			p.inits++
			continue
		}
		if !fn.Name.IsExported() || fn.Type.TypeParams != nil || fn.Type.Results != nil {
			continue
		}
		if k := classify(fn.Type.Params, httpName, analyticsName); k != "" {
			p.hooks = append(p.hooks, hook{fn.Name.Name, k})
		}
	}
	// A body only assigned to (res.Body = ...) is replaced, not read.
	assigned := map[ast.Expr]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		if a, ok := n.(*ast.AssignStmt); ok {
			for _, l := range a.Lhs {
				assigned[l] = true
			}
		}
		if s, ok := n.(*ast.SelectorExpr); ok && bodyReaders[s.Sel.Name] && !assigned[s] {
			p.readsBody = true
		}
		return true
	})
	sort.Slice(edits, func(i, j int) bool { return edits[i].off > edits[j].off })
	out := append([]byte{}, src...)
	for _, e := range edits {
		out = append(out[:e.off], append([]byte(e.text), out[e.end:]...)...)
	}
	return out, nil
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func classify(params *ast.FieldList, httpName, analyticsName string) hookKind {
	var types []string
	for _, f := range params.List {
		n := len(f.Names)
		if n == 0 {
			n = 1
		}
		for i := 0; i < n; i++ {
			types = append(types, typeString(f.Type))
		}
	}
	sig := strings.Join(types, ",")
	h := httpName
	switch {
	case h != "" && sig == h+".ResponseWriter,*"+h+".Request":
		return request
	case h != "" && sig == h+".ResponseWriter,*"+h+".Response,*"+h+".Request":
		return response
	case analyticsName != "" && sig == "*"+analyticsName+".AnalyticsRecord":
		return analytics
	}
	return ""
}

func typeString(e ast.Expr) string {
	switch t := e.(type) {
	case *ast.Ident:
		return t.Name
	case *ast.StarExpr:
		return "*" + typeString(t.X)
	case *ast.SelectorExpr:
		return typeString(t.X) + "." + t.Sel.Name
	}
	return "?"
}

// names are the names a hook is exported under: always <dir>.<Name>, and <Name> when no
// other package of the bundle exports the same name.
func (b *bundle) names(p *pkg, h hook) []string {
	long := p.base + "." + h.name
	if b.count[h.name] == 1 {
		return []string{h.name, long}
	}
	return []string{long}
}

// writeOverlay writes the generated sources under work and returns the overlay file that
// maps them into the plugins' module.
func (b *bundle) writeOverlay(work string) (string, error) {
	replace := map[string]string{}
	var main bytes.Buffer
	main.WriteString("// Code generated by gatehouse-go. DO NOT EDIT.\n\npackage main\n\nimport (\n\tgatehouse \"gatehouse.dev/go\"\n")
	for i, p := range b.pkgs {
		fmt.Fprintf(&main, "\tp%d %q\n", i, p.path)
	}
	main.WriteString(")\n\nfunc init() {\n")
	for i, p := range b.pkgs {
		for n := 0; n < p.inits; n++ {
			fmt.Fprintf(&main, "\tgatehouse.Init(%q, p%d.GatehouseInit%d)\n", p.dir, i, n)
		}
	}
	for i, p := range b.pkgs {
		for _, h := range p.hooks {
			for _, name := range b.names(p, h) {
				switch h.kind {
				case request:
					fmt.Fprintf(&main, "\tgatehouse.Request(%q, p%d.%s, %v)\n", name, i, h.name, p.readsBody)
				case response:
					fmt.Fprintf(&main, "\tgatehouse.Response(%q, p%d.%s, %v)\n", name, i, h.name, p.readsBody)
				case analytics:
					fmt.Fprintf(&main, "\tgatehouse.Analytics(%q, p%d.%s)\n", name, i, h.name)
				}
			}
		}
	}
	main.WriteString("}\n\nfunc main() {}\n")
	n := 0
	put := func(virtual string, src []byte, orig string) error {
		if src == nil {
			replace[virtual] = orig
			return nil
		}
		n++
		real := filepath.Join(work, strconv.Itoa(n)+"_"+filepath.Base(virtual))
		if err := os.MkdirAll(filepath.Dir(real), 0o755); err != nil {
			return err
		}
		replace[virtual] = real
		return os.WriteFile(real, src, 0o644)
	}
	if err := put(filepath.Join(b.modRoot, genDir, "main.go"), main.Bytes(), ""); err != nil {
		return "", err
	}
	for _, p := range b.pkgs {
		for _, f := range p.files {
			if err := put(filepath.Join(p.abs, pkgDir, f.name), f.src, f.path); err != nil {
				return "", err
			}
		}
	}
	j, err := json.Marshal(map[string]any{"Replace": replace})
	if err != nil {
		return "", err
	}
	overlay := filepath.Join(work, "overlay.json")
	return overlay, os.WriteFile(overlay, j, 0o644)
}
