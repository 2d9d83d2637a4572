// Command cluster runs a real kube-apiserver (k8s.io/kubernetes, compiled in as
// a library) together with an embedded etcd, both on loopback only, for
// Gatehouse's end-to-end tests. It is the same idea as controller-runtime's
// envtest or k3s: no kubelet, scheduler or controller-manager, just the API
// server chain (aggregator -> kube-apiserver -> apiextensions-apiserver), so
// CRDs (with CEL x-kubernetes-validations), server-side apply, status
// subresources, Leases, Events, EndpointSlices, RBAC, TokenRequest and
// TokenReview all work.
//
// Usage:
//
//	cluster --data-dir DIR [--port N] [-- extra kube-apiserver flags...]
//
// Data directory policy: every start WIPES the state this program owns in DIR
// (DIR/etcd, DIR/pki, DIR/kubeconfig, DIR/admin.token) and begins with an
// empty cluster and fresh certificates and keys. Nothing survives a restart;
// restarting with the same DIR is supported and gives a clean cluster. Other
// files in DIR (e.g. the pid file and log written by ../cluster.sh) are left
// alone.
//
// Layout of DIR after a start:
//
//	DIR/etcd/            embedded etcd data (fsync disabled: test use only)
//	DIR/pki/             CA, serving cert, admin client cert, service-account keys,
//	                     static token file
//	DIR/admin.token      bearer token of a static admin user (group system:masters)
//	DIR/kubeconfig       admin kubeconfig (client certificate, CA embedded); written
//	                     atomically only once GET /readyz answers 200, and removed on
//	                     shutdown, so callers can wait for it to appear
//
// Build it with ../cluster.sh, which also stamps the Kubernetes version into
// the binary via -ldflags (otherwise /version reports v0.0.0-master).
//
// The process runs until SIGTERM or SIGINT, then shuts the API server down
// gracefully and closes etcd (a second signal exits at once).
//
// Choices made for a controller-less cluster:
//   - --disable-admission-plugins=ServiceAccount: without the token and
//     service-account controllers no "default" ServiceAccount exists in new
//     namespaces, and that plugin would reject every Pod (envtest does the same).
//   - --endpoint-reconciler-type=none: the advertise address is 127.0.0.1,
//     which is not a valid Endpoints address; nothing serves the in-cluster
//     "kubernetes" Service anyway.
//   - --authorization-mode=RBAC; the admin identity is in system:masters.
//   - Without kube-controller-manager there is no namespace controller and no
//     garbage collector: a deleted namespace stays Terminating and owner
//     references do not cascade.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

const (
	serviceCIDR = "10.0.0.0/24"
	serviceIP   = "10.0.0.1"
	saIssuer    = "https://kubernetes.default.svc.cluster.local"
	clusterName = "gatehouse-e2e"
	adminUser   = "gatehouse-admin"
)

// errInterrupted: shutdown began before the server became ready.
var errInterrupted = errors.New("interrupted before ready")

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "cluster: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	dataDir := flag.String("data-dir", "", "directory for etcd data, certificates and the kubeconfig (required; its owned contents are wiped at start)")
	port := flag.Int("port", 0, "secure port of the API server on 127.0.0.1 (0: pick a free one)")
	readyTimeout := flag.Duration("ready-timeout", 5*time.Minute, "give up if /readyz is not OK within this time")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s --data-dir DIR [--port N] [-- kube-apiserver flags...]\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if *dataDir == "" {
		flag.Usage()
		return errors.New("--data-dir is required")
	}
	dir, err := filepath.Abs(*dataDir)
	if err != nil {
		return err
	}
	etcdDir := filepath.Join(dir, "etcd")
	pkiDir := filepath.Join(dir, "pki")
	kubeconfigPath := filepath.Join(dir, "kubeconfig")
	tokenPath := filepath.Join(dir, "admin.token")

	// Fresh state on every start (see the package comment).
	for _, p := range []string{etcdDir, pkiDir, kubeconfigPath, tokenPath} {
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("wiping %s: %w", p, err)
		}
	}
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return err
	}

	if *port == 0 {
		if *port, err = freePort(); err != nil {
			return err
		}
	}
	pki, err := writePKI(pkiDir)
	if err != nil {
		return fmt.Errorf("generating certificates: %w", err)
	}
	if err := os.WriteFile(tokenPath, []byte(pki.adminToken+"\n"), 0o600); err != nil {
		return err
	}

	// Building the command installs the SIGTERM/SIGINT handler
	// (genericapiserver.SetupSignalContext); its context is cancelled on the
	// first signal, and a second signal exits the process.
	cmd := app.NewAPIServerCommand()
	ctx := cmd.Context()

	etcd, etcdURL, err := startEtcd(ctx, etcdDir)
	if err != nil {
		return fmt.Errorf("starting etcd: %w", err)
	}
	defer func() {
		etcd.Close()
		fmt.Fprintln(os.Stderr, "cluster: etcd stopped")
	}()

	args := []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(*port),
		"--tls-cert-file=" + pki.servingCert,
		"--tls-private-key-file=" + pki.servingKey,
		"--client-ca-file=" + pki.caCert,
		"--token-auth-file=" + pki.tokenFile,
		"--service-account-issuer=" + saIssuer,
		"--service-account-key-file=" + pki.saPub,
		"--service-account-signing-key-file=" + pki.saKey,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--authorization-mode=RBAC",
		"--disable-admission-plugins=ServiceAccount",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
		"--cert-dir=" + pkiDir,
	}
	args = append(args, flag.Args()...)
	cmd.SetArgs(args)

	kubeconfig := buildKubeconfig(*port, pki)
	readyErr := make(chan error, 1)
	go func() {
		readyErr <- waitReadyAndWriteKubeconfig(ctx, *port, pki, kubeconfig, kubeconfigPath, *readyTimeout)
	}()
	go func() {
		err := <-readyErr
		if errors.Is(err, errInterrupted) {
			return
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "cluster: %v\n", err)
			// Make the failure visible to callers waiting for the kubeconfig.
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "cluster: ready, kubeconfig written to %s (https://127.0.0.1:%d)\n", kubeconfigPath, *port)
	}()

	runErr := cmd.Execute()
	_ = os.Remove(kubeconfigPath)
	if runErr != nil {
		return fmt.Errorf("kube-apiserver: %w", runErr)
	}
	fmt.Fprintln(os.Stderr, "cluster: kube-apiserver stopped")
	return nil
}

// freePort asks the kernel for a free loopback TCP port. The port is released
// again before use, so there is a small race with other processes.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func startEtcd(ctx context.Context, dir string) (*embed.Etcd, string, error) {
	clientPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return nil, "", err
	}
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(clientPort))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(peerPort))}

	cfg := embed.NewConfig()
	cfg.Name = "gatehouse-e2e"
	cfg.Dir = dir
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.UnsafeNoFsync = true // throw-away test data
	cfg.QuotaBackendBytes = 2 << 30

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, "", err
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, clientURL.String(), nil
	case err := <-e.Err():
		e.Close()
		return nil, "", err
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, "", errors.New("etcd not ready after 60s")
	case <-ctx.Done():
		e.Close()
		return nil, "", errors.New("interrupted while starting etcd")
	}
}

type pkiFiles struct {
	caCert, servingCert, servingKey, saKey, saPub, tokenFile string
	caPEM, adminCertPEM, adminKeyPEM                         []byte
	adminToken                                               string
}

func writePKI(dir string) (*pkiFiles, error) {
	p := &pkiFiles{
		caCert:      filepath.Join(dir, "ca.crt"),
		servingCert: filepath.Join(dir, "apiserver.crt"),
		servingKey:  filepath.Join(dir, "apiserver.key"),
		saKey:       filepath.Join(dir, "sa.key"),
		saPub:       filepath.Join(dir, "sa.pub"),
		tokenFile:   filepath.Join(dir, "tokens.csv"),
	}
	now := time.Now().Add(-time.Hour)
	notAfter := now.Add(10 * 365 * 24 * time.Hour)

	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "gatehouse-e2e-ca"},
		NotBefore:             now,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	if err := os.WriteFile(p.caCert, p.caPEM, 0o644); err != nil {
		return nil, err
	}

	// Serving certificate for 127.0.0.1 / localhost (and the in-cluster names).
	servingCertPEM, servingKeyPEM, err := leaf(ca, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.IPv6loopback, net.ParseIP(serviceIP)},
	}, now, notAfter)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.servingCert, servingCertPEM, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.servingKey, servingKeyPEM, 0o600); err != nil {
		return nil, err
	}

	// Admin client certificate: group system:masters bypasses RBAC.
	p.adminCertPEM, p.adminKeyPEM, err = leaf(ca, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: adminUser, Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, now, notAfter)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "admin.crt"), p.adminCertPEM, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "admin.key"), p.adminKeyPEM, 0o600); err != nil {
		return nil, err
	}

	// Service-account token signing key pair (RS256, the common default).
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, err
	}
	saKeyDER, err := x509.MarshalPKCS8PrivateKey(saKey)
	if err != nil {
		return nil, err
	}
	saPubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.saKey, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: saKeyDER}), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(p.saPub, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPubDER}), 0o644); err != nil {
		return nil, err
	}

	// Static bearer token for the same admin identity (handy for curl).
	tok := make([]byte, 24)
	if _, err := rand.Read(tok); err != nil {
		return nil, err
	}
	p.adminToken = hex.EncodeToString(tok)
	csv := fmt.Sprintf("%s,%s-token,%s-token,\"system:masters\"\n", p.adminToken, adminUser, adminUser)
	if err := os.WriteFile(p.tokenFile, []byte(csv), 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

// leaf signs an ECDSA P-256 certificate from tmpl with the CA. The key is
// returned as PKCS#8 ("PRIVATE KEY"), which Go, OpenSSL and rustls all read.
func leaf(ca *x509.Certificate, caKey crypto.Signer, tmpl *x509.Certificate, notBefore, notAfter time.Time) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl.SerialNumber = serial()
	tmpl.NotBefore = notBefore
	tmpl.NotAfter = notAfter
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

func buildKubeconfig(port int, p *pkiFiles) *clientcmdapi.Config {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[clusterName] = &clientcmdapi.Cluster{
		Server:                   fmt.Sprintf("https://127.0.0.1:%d", port),
		CertificateAuthorityData: p.caPEM,
	}
	cfg.AuthInfos[adminUser] = &clientcmdapi.AuthInfo{
		ClientCertificateData: p.adminCertPEM,
		ClientKeyData:         p.adminKeyPEM,
	}
	cfg.Contexts[clusterName] = &clientcmdapi.Context{
		Cluster:   clusterName,
		AuthInfo:  adminUser,
		Namespace: "default",
	}
	cfg.CurrentContext = clusterName
	return cfg
}

// waitReadyAndWriteKubeconfig polls https://127.0.0.1:PORT/readyz with the
// admin credentials and writes the kubeconfig atomically once it answers 200.
func waitReadyAndWriteKubeconfig(ctx context.Context, port int, p *pkiFiles, cfg *clientcmdapi.Config, path string, timeout time.Duration) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.caPEM)
	cert, err := tls.X509KeyPair(p.adminCertPEM, p.adminKeyPEM)
	if err != nil {
		return err
	}
	client := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{
			RootCAs:      pool,
			Certificates: []tls.Certificate{cert},
			ServerName:   "127.0.0.1",
		}},
	}
	readyz := fmt.Sprintf("https://127.0.0.1:%d/readyz", port)
	deadline := time.Now().Add(timeout)
	for {
		resp, err := client.Get(readyz)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not OK after %s (last error: %v)", readyz, timeout, err)
		}
		select {
		case <-ctx.Done():
			return errInterrupted
		case <-time.After(250 * time.Millisecond):
		}
	}
	tmp := path + ".tmp"
	if err := clientcmd.WriteToFile(*cfg, tmp); err != nil {
		return fmt.Errorf("writing kubeconfig: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("writing kubeconfig: %w", err)
	}
	return nil
}
