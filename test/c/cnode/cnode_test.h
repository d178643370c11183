/* cnode_test.h: helpers that the C-node's test binaries (test_cnode.c,
 * test_dist.c) share: clocks, a bounded printf into a buffer, and
 * argument lists.  Each binary includes it once, after cmocka and ei. */
#ifndef MOAT_CNODE_TEST_H
#define MOAT_CNODE_TEST_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <ei.h>

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
