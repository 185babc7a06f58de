// A Go process for `cargo xtask bench` to measure what reading its goroutine profile costs it: N parked
// goroutines with stacks a few frames deep (a tunnel's connection goroutines are not one frame), Go's own
// /debug/pprof handlers, go_goroutines at /metrics and a trivial /ping for a steady request loop. Ours, written for the bench; it
// uses only the standard library.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"runtime"
	"sync"
)

// park blocks for ever below `depth` more frames, in one of two ways so that the profile has more than
// one stack: a select on two channels (how an idle pooled connection waits) or a receive.
func park(depth int, kind int, ready *sync.WaitGroup, never chan struct{}) {
	if depth > 0 {
		park(depth-1, kind, ready, never)
		return
	}
	ready.Done()
	if kind == 0 {
		other := make(chan struct{})
		select {
		case <-never:
		case <-other:
		}
	} else {
		<-never
	}
}

func main() {
	goroutines := flag.Int("goroutines", 1000, "parked goroutines to hold")
	depth := flag.Int("depth", 8, "frames of park() above each parked goroutine's wait")
	listen := flag.String("listen", "127.0.0.1:0", "address to serve /ping and /debug/pprof on")
	flag.Parse()

	never := make(chan struct{})
	var ready sync.WaitGroup
	ready.Add(*goroutines)
	for i := 0; i < *goroutines; i++ {
		go park(*depth, i%2, &ready, never)
	}
	ready.Wait()

	http.HandleFunc("/ping", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("pong"))
	})
	// What a Go tunnel's metrics say for free: leakwatch bounds its profile reads by this count.
	http.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "# HELP go_goroutines Number of goroutines that currently exist.\n# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	})
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The driver waits for this line: every goroutine is parked and the server is accepting.
	fmt.Printf("listening %s\n", l.Addr())
	if err := http.Serve(l, nil); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
