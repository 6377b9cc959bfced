// Command coredns is CoreDNS with the plugins that a local cluster's DNS uses: the cluster.local
// zone served from the apiserver (kubernetes), health, readiness, metrics, a cache. There is no
// forward plugin: names outside the cluster are not resolved, so no pod's query leaves the machine.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
)

// Plugins run in this order, the order of CoreDNS's own plugin.cfg.
var directives = []string{
	"bind", "ready", "health", "prometheus", "errors", "loadbalance", "cache", "kubernetes",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
