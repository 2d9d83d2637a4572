// Command gatehouse-go builds Tyk-style Go plugins into one Gatehouse plugin library.
//
//	gatehouse-go build -o plugins.so ./pkg-a ./pkg-b
//
// Each directory is a `package main` plugin as Tyk builds them. Their exported hooks
// (func(http.ResponseWriter, *http.Request), func(http.ResponseWriter, *http.Response,
// *http.Request) and func(*analytics.AnalyticsRecord)) are exported from ONE shared object
// under their Go names, and as <dir>.<Name> (always; the plain name only when one package
// has it). It runs the go command on PATH: the plugins' module decides the Go version.
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "gatehouse-go:", err)
		os.Exit(1)
	}
}

const usage = `usage: gatehouse-go build -o <library.so> [-tags t1,t2] [-ldflags flags] [-v] [-x] <plugin dir>...

Builds the Tyk-style Go plugins in the given directories (each a "package main" of the
same Go module) into one Gatehouse plugin library.`

func run(args []string) error {
	if len(args) == 0 || args[0] != "build" {
		return errors.New(usage)
	}
	fs := flag.NewFlagSet("build", flag.ContinueOnError)
	out := fs.String("o", "", "the library to write")
	verbose := fs.Bool("v", false, "list the hooks found and the go command run")
	keep := fs.Bool("x", false, "keep the generated sources and print where they are")
	tags := fs.String("tags", "", "build tags, as for go build")
	ldflags := fs.String("ldflags", "", "linker flags, as for go build (-s -w makes the library smaller)")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if *out == "" || fs.NArg() == 0 {
		return errors.New(usage)
	}
	b, err := plan(fs.Args(), splitTags(*tags))
	if err != nil {
		return err
	}
	if *verbose {
		for _, p := range b.pkgs {
			for _, h := range p.hooks {
				fmt.Fprintf(os.Stderr, "%s: %s hook %s (exported as %s)%s\n", p.dir, h.kind, h.name,
					strings.Join(b.names(p, h), ", "), map[bool]string{true: ", reads the body"}[p.readsBody])
			}
		}
	}
	outAbs, err := filepath.Abs(*out)
	if err != nil {
		return err
	}
	var extra []string
	if *tags != "" {
		extra = append(extra, "-tags", *tags)
	}
	if *ldflags != "" {
		extra = append(extra, "-ldflags", *ldflags)
	}
	return b.build(outAbs, extra, *verbose, *keep)
}

func splitTags(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' })
}

// build writes the generated packages as an overlay (nothing is written into the
// plugins' module) and runs go build -buildmode=c-shared on them.
func (b *bundle) build(out string, extra []string, verbose, keep bool) error {
	work, err := os.MkdirTemp("", "gatehouse-go-")
	if err != nil {
		return err
	}
	if keep {
		fmt.Fprintln(os.Stderr, "gatehouse-go: generated sources in", work)
	} else {
		defer os.RemoveAll(work)
	}
	overlay, err := b.writeOverlay(work)
	if err != nil {
		return err
	}
	args := append([]string{"build", "-buildmode=c-shared", "-overlay", overlay, "-o", out}, extra...)
	cmd := exec.Command("go", append(args, "./"+b.genDir)...)
	cmd.Dir = b.modRoot
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if verbose {
		fmt.Fprintln(os.Stderr, "gatehouse-go: (cd", b.modRoot, "&&", strings.Join(cmd.Args, " ")+")")
	}
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build failed: %w", err)
	}
	// c-shared also writes a C header for the library's exports; a plugin has no use for it.
	_ = os.Remove(strings.TrimSuffix(out, filepath.Ext(out)) + ".h")
	return nil
}
