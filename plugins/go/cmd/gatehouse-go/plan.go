package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// genDir is where, inside the plugins' module, the overlay puts the generated packages.
const genDir = "gatehouse_bundle"

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
}

func plan(dirs []string, tags []string) (*bundle, error) {
	b := &bundle{genDir: genDir, count: map[string]int{}}
	names := map[string]string{}
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
		p, err := load(d, abs, tags)
		if err != nil {
			return nil, err
		}
		if other, dup := names[p.name]; dup {
			return nil, fmt.Errorf("%s and %s have the same directory name: rename one", other, d)
		}
		names[p.name] = d
		for _, h := range p.hooks {
			b.count[h.name]++
		}
		b.pkgs = append(b.pkgs, p)
	}
	gomod, err := os.ReadFile(filepath.Join(b.modRoot, "go.mod"))
	if err != nil {
		return nil, err
	}
	b.modPath = modulePath(gomod)
	if b.modPath == "" {
		return nil, fmt.Errorf("%s/go.mod has no module line", b.modRoot)
	}
	if !bytes.Contains(gomod, []byte("gatehouse.dev/go")) {
		return nil, fmt.Errorf("the module %s (%s/go.mod) does not require gatehouse.dev/go: run `go get gatehouse.dev/go` there (or add a require and a replace directive pointing at a copy of plugins/go)", b.modPath, b.modRoot)
	}
	if _, err := os.Stat(filepath.Join(b.modRoot, genDir)); err == nil {
		return nil, fmt.Errorf("%s/%s exists: gatehouse-go generates a package of that name; move it away", b.modRoot, genDir)
	}
	return b, nil
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

// load reads a plugin directory: its files (as the go command would pick them for this
// platform), its hooks and init functions.
func load(dir, abs string, tags []string) (*pkg, error) {
	ctxt := build.Default
	ctxt.BuildTags = tags
	bp, err := ctxt.ImportDir(abs, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	if bp.Name != "main" {
		return nil, fmt.Errorf("%s is package %s: a plugin is a package main, as Tyk builds them", dir, bp.Name)
	}
	p := &pkg{dir: dir, base: filepath.Base(abs), name: packageName(filepath.Base(abs))}
	fset := token.NewFileSet()
	gofiles := append(append([]string{}, bp.GoFiles...), bp.CgoFiles...)
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
			return nil, err
		}
		p.files = append(p.files, srcFile{name: name, src: out, path: path})
	}
	for _, list := range [][]string{bp.CFiles, bp.HFiles, bp.SFiles, bp.CXXFiles, bp.SysoFiles} {
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
		switch path {
		case "net/http":
			httpName = or(name, "http")
		case "gatehouse.dev/go/analytics", "github.com/TykTechnologies/tyk-pump/analytics":
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
		fmt.Fprintf(&main, "\tp%d %q\n", i, b.modPath+"/"+genDir+"/"+p.name)
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
	put := func(rel string, src []byte, orig string) error {
		virtual := filepath.Join(b.modRoot, genDir, rel)
		if src == nil {
			replace[virtual] = orig
			return nil
		}
		real := filepath.Join(work, rel)
		if err := os.MkdirAll(filepath.Dir(real), 0o755); err != nil {
			return err
		}
		replace[virtual] = real
		return os.WriteFile(real, src, 0o644)
	}
	if err := put("main.go", main.Bytes(), ""); err != nil {
		return "", err
	}
	for _, p := range b.pkgs {
		for _, f := range p.files {
			if err := put(filepath.Join(p.name, f.name), f.src, f.path); err != nil {
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
