/* What loopfast's C floor programs share: a connected TCP pair over 127.0.0.1 (one end in a
 * child process), exact reads and writes, and a monotonic clock. POSIX only. */
#ifndef LOOPFAST_FLOOR_LOOPBACK_H
#define LOOPFAST_FLOOR_LOOPBACK_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void no_delay(int fd) {
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("setsockopt");
}

/* Read exactly n bytes; busy-polling (MSG_DONTWAIT, retried) when spin is set. */
static void read_all(int fd, char *buf, size_t n, int spin) {
    while (n > 0) {
        ssize_t got = recv(fd, buf, n, spin ? MSG_DONTWAIT : 0);
        if (got > 0) {
            buf += got;
            n -= (size_t)got;
        } else if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            continue;
        } else {
            fprintf(stderr, "recv: %s\n", got == 0 ? "the peer closed" : strerror(errno));
            exit(1);
        }
    }
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n > 0) {
        ssize_t put = send(fd, buf, n, MSG_NOSIGNAL);
        if (put > 0) {
            buf += put;
            n -= (size_t)put;
        } else if (put < 0 && errno == EINTR) {
            continue;
        } else {
            die("send");
        }
    }
}

/* Fork a child connected to this process over 127.0.0.1; returns this side's socket and sets
 * *child_fd in the child (and -1 here). The listening socket is closed on both sides. */
static int loopback_pair(pid_t *pid, int *child_fd) {
    struct sockaddr_in addr;
    socklen_t len = sizeof addr;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(listener, 1) < 0) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) < 0) die("getsockname");
    *pid = fork();
    if (*pid < 0) die("fork");
    if (*pid == 0) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) die("accept");
        close(listener);
        no_delay(fd);
        *child_fd = fd;
        return -1;
    }
    close(listener);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
    no_delay(fd);
    *child_fd = -1;
    return fd;
}

static int wait_child(pid_t pid) {
    int status = 0;
    if (waitpid(pid, &status, 0) < 0) die("waitpid");
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

#endif
