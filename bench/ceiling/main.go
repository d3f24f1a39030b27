// ceiling is a null ext_authz server: every Check answers OK with no headers, at once.
// scripts/bench runs Envoy in front of it (the "ceiling" setup), so every ratio can be
// read against what any ext_authz server could do on this machine: the gRPC call and
// Envoy's ext_authz filter are paid, no decision is made. The service is Envoy's
// envoy.service.auth.v3.Authorization
// (https://www.envoyproxy.io/docs/envoy/latest/api-v3/service/auth/v3/external_auth.proto).
//
//	ceiling -addr 127.0.0.1:9191
//
// Plaintext gRPC, like opa-envoy-plugin in the peer setup. It prints "serving <addr>"
// on stdout once it listens; exit code 2 on a bad flag or an address it cannot bind.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

type null struct {
	authv3.UnimplementedAuthorizationServer
}

// The one answer, built once: status OK and an empty OkHttpResponse.
var ok = &authv3.CheckResponse{
	Status:       &status.Status{Code: int32(codes.OK)},
	HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
}

func (null) Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return ok, nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9191", "host:port to serve gRPC on")
	flag.Parse()
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	server := grpc.NewServer()
	authv3.RegisterAuthorizationServer(server, null{})
	fmt.Printf("serving %s\n", lis.Addr())
	if err := server.Serve(lis); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
