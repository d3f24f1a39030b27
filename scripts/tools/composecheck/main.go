// composecheck loads Compose files the way `docker compose config` does (compose-go:
// the Compose Specification JSON schema, interpolation, merging of several -f files,
// profiles, and the consistency checks that refuse references to undefined services,
// networks, volumes, secrets and configs) and prints the resolved project as JSON.
// It needs no Docker engine.
//
//	composecheck [--env-file FILE] [--profile NAME]... -f FILE [-f FILE]...
//
// Exit codes: 0 valid (JSON on stdout), 1 invalid (the loader's error on stderr), 2 usage.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var files, profiles list
	envFile := flag.String("env-file", "", "file of variables for interpolation (instead of the OS environment)")
	flag.Var(&files, "f", "Compose file (repeat to merge, in order)")
	flag.Var(&profiles, "profile", "profile to enable (repeatable)")
	flag.Parse()
	if len(files) == 0 || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: composecheck [--env-file FILE] [--profile NAME]... -f FILE [-f FILE]...")
		os.Exit(2)
	}
	// The project directory is the first file's, as for docker compose.
	workdir, err := filepath.Abs(filepath.Dir(files[0]))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	opts := []cli.ProjectOptionsFn{
		cli.WithWorkingDirectory(workdir),
		cli.WithName("authz"),
		cli.WithProfiles(profiles),
		cli.WithConsistency(true),
		cli.WithResolvedPaths(true),
	}
	if *envFile != "" {
		opts = append(opts, cli.WithEnvFiles(*envFile), cli.WithDotEnv)
	}
	options, err := cli.NewProjectOptions(files, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}
