/*
 * bench/peers/moat_bench_ei.c: the "bare ei echo" peer of moat_bench's
 * distribution round trip (row 4d), the C-node people write with ei
 * alone: one thread, blocking reads, every message sent straight back.
 *
 * It takes its node name and cookie from the environment (never argv,
 * which every user of the machine can read):
 *
 *   MOAT_BENCH_EI_NODE    alive@host
 *   MOAT_BENCH_EI_COOKIE  the VM's cookie
 *
 * It publishes the name to epmd, writes the line "listening" on stdout,
 * and serves the first connection: a message to any registered name goes
 * back, unchanged, to its sender (a message to its pid carries no
 * sender, and is dropped).  ei answers ticks
 * inside its receive.  It exits when the connection ends, when no
 * connection comes within ACCEPT_TMO_MS, or when its stdin closes (a
 * port program's end): a second thread blocks reading stdin, so the
 * echo's own path makes no system call beyond ei's reads and its send.
 * Built by `make bench`, `make shell` and `make iex` into
 * _build/c/plain/bench/, never into priv/.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ei.h>

#define ACCEPT_TMO_MS 10000

static void *watch_stdin(void *arg) {
    char buf[64];

    (void)arg;
    while (read(0, buf, sizeof buf) > 0)
        ;
    _exit(0);
}

static int fail(const char *why) {
    fprintf(stderr, "moat_bench_ei: %s\n", why);
    return 2;
}

int main(void) {
    const char *node = getenv("MOAT_BENCH_EI_NODE");
    const char *cookie = getenv("MOAT_BENCH_EI_COOKIE");
    char alive[EI_MAXALIVELEN + 1];
    const char *at;
    struct in_addr addr;
    ei_cnode ec;
    ErlConnect con;
    erlang_msg msg;
    ei_x_buff x;
    pthread_t watcher;
    int port = 0, lfd, fd;

    signal(SIGPIPE, SIG_IGN); /* ei writes without MSG_NOSIGNAL */
    if (node == NULL || cookie == NULL)
        return fail("MOAT_BENCH_EI_NODE and MOAT_BENCH_EI_COOKIE must be set");
    at = strchr(node, '@');
    if (at == NULL || at == node || (size_t)(at - node) > EI_MAXALIVELEN)
        return fail("MOAT_BENCH_EI_NODE is not alive@host");
    memcpy(alive, node, (size_t)(at - node));
    alive[at - node] = '\0';
    if (pthread_create(&watcher, NULL, watch_stdin, NULL) != 0)
        return fail("cannot start the stdin watcher");
    addr.s_addr = htonl(INADDR_LOOPBACK);
    if (ei_init() != 0 ||
        ei_connect_xinit(&ec, at + 1, alive, node, &addr, cookie, 0) < 0)
        return fail("ei refused the node name or cookie");
    lfd = ei_listen(&ec, &port, 1);
    if (lfd < 0)
        return fail("cannot listen");
    if (ei_publish(&ec, port) < 0)
        return fail("cannot publish the name to epmd");
    printf("listening\n");
    fflush(stdout);
    fd = ei_accept_tmo(&ec, lfd, &con, ACCEPT_TMO_MS);
    if (fd < 0)
        return fail("no connection came");
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &(int){1}, sizeof(int));
    if (ei_x_new(&x) < 0)
        return fail("out of memory");
    for (;;) {
        int rc = ei_xreceive_msg(fd, &msg, &x);

        if (rc == ERL_TICK)
            continue;
        if (rc == ERL_ERROR)
            return 0; /* closed, or a control message ei cannot read */
        if (msg.msgtype == ERL_REG_SEND &&
            ei_send(fd, &msg.from, x.buff, x.index) < 0)
            return 0;
    }
}
