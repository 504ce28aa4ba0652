/* LD_PRELOAD helper: on SIGSEGV / SIGBUS / SIGABRT, print the native stack (glibc backtrace, symbol names of exported
 * functions) to stderr, then die by the same signal. For a crash on a machine without gdb (the GPU machine:
 * benchmarks/probes/gemm_cat_lengths.py). Build and use:
 *   gcc -shared -fPIC -O1 -o /tmp/segv_backtrace.so benchmarks/probes/segv_backtrace.c
 *   LD_PRELOAD=/tmp/segv_backtrace.so python3 benchmarks/probes/gemm_cat_lengths.py
 * Addresses without a name can be resolved with addr2line -f -C -e <library> <offset> (the offset is printed). */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_fatal(int sig) {
  void* frames[64];
  const int n = backtrace(frames, 64);
  static const char head[] = "\n*** native stack (segv_backtrace.so) ***\n";
  write(2, head, sizeof head - 1);
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_fatal;
  sa.sa_flags = SA_RESETHAND | SA_ONSTACK;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
}
