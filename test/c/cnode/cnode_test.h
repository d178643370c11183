/* cnode_test.h: helpers that the C-node's test binaries (test_cnode.c,
 * test_dist.c) share: their environment, clocks, a bounded printf into a
 * buffer, and argument lists.  Each binary includes it once, after
 * cmocka and ei. */
#ifndef MOAT_CNODE_TEST_H
#define MOAT_CNODE_TEST_H

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <ei.h>

/* What make test-c sets: the executable, the demo library and the test
 * library; MOAT_CNODE_RUNNER (valgrind, say) split on blanks. */
static const char *cnode_path, *demo_path, *lib_path;
static char *runner[32];
static int nrunner;

/* Reads the environment above and makes the process fit to drive nodes:
 * a node that dies while we write must not kill the test (SIGPIPE), and
 * a segfault test must not leave a core file behind.  Returns 0, or -1
 * after saying what is missing. */
static int cnode_test_init(const char *suite) {
    static char buf[4096];
    const char *r = getenv("MOAT_CNODE_RUNNER");
    struct rlimit nocore = {0, 0};

    cnode_path = getenv("MOAT_CNODE");
    demo_path = getenv("MOAT_DEMO_SO");
    lib_path = getenv("MOAT_CNODE_LIB");
    if (cnode_path == NULL || demo_path == NULL || lib_path == NULL) {
        fprintf(stderr, "%s: set MOAT_CNODE, MOAT_DEMO_SO and MOAT_CNODE_LIB "
                        "(make test-c does)\n", suite);
        return -1;
    }
    if (r != NULL && *r != '\0') {
        snprintf(buf, sizeof buf, "%s", r);
        for (char *tok = strtok(buf, " \t"); tok != NULL && nrunner < 31;
             tok = strtok(NULL, " \t"))
            runner[nrunner++] = tok;
    }
    signal(SIGPIPE, SIG_IGN);
    setrlimit(RLIMIT_CORE, &nocore);
    return 0;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Appends printf's output to o[*n..cap), cutting it at cap. */
static void put(char *o, size_t cap, size_t *n, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void put(char *o, size_t cap, size_t *n, const char *fmt, ...) {
    va_list ap;
    int k;
    if (*n >= cap)
        return;
    va_start(ap, fmt);
    k = vsnprintf(o + *n, cap - *n, fmt, ap);
    va_end(ap);
    *n = k < 0 ? cap : *n + (size_t)k;
}

/* Argument lists, without a version byte. */
static ei_x_buff args_long(long v) {
    ei_x_buff x;
    ei_x_new(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_long(&x, v);
    ei_x_encode_empty_list(&x);
    return x;
}

static ei_x_buff args_binary(const char *s) {
    ei_x_buff x;
    ei_x_new(&x);
    ei_x_encode_list_header(&x, 1);
    ei_x_encode_binary(&x, s, (long)strlen(s));
    ei_x_encode_empty_list(&x);
    return x;
}

static ei_x_buff args_none(void) {
    ei_x_buff x;
    ei_x_new(&x);
    ei_x_encode_empty_list(&x);
    return x;
}

#endif
