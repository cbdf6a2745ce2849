// The pause process of every pod sandbox on the node profile: it holds the pod's namespaces,
// reaps the zombies it inherits as PID 1 of a pod that shares its process namespace, and exits 0
// on SIGINT or SIGTERM. It is built here (static, CGO off) because nothing is pulled.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
