/* loopfast's round-trip floor: what plain C reaches for a SIZE-byte round trip over TCP
 * 127.0.0.1 between two processes, the receiver blocking in recv() (SPIN=0) or busy-polling
 * recv(MSG_DONTWAIT) (SPIN=1), as a spinning receiver would.
 *
 *     pingpong SPIN SIZE COUNT
 *
 * prints "pingpong spin=S size=N count=C: rtt median X us p99 Y us". */
#include "loopback.h"

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SPIN SIZE COUNT\n", argv[0]);
        return 2;
    }
    int spin = atoi(argv[1]);
    size_t size = (size_t)strtoul(argv[2], NULL, 10);
    long count = atol(argv[3]);
    if (size == 0 || count < 1) {
        fprintf(stderr, "SIZE and COUNT must be positive\n");
        return 2;
    }
    char *buf = malloc(size);
    double *rtt = malloc(sizeof(double) * (size_t)count);
    if (buf == NULL || rtt == NULL) die("malloc");
    memset(buf, 'x', size);
    pid_t pid;
    int echo;
    int fd = loopback_pair(&pid, &echo);
    if (fd < 0) {  /* the child: echo every message back */
        for (long i = 0; i < count; i++) {
            read_all(echo, buf, size, spin);
            write_all(echo, buf, size);
        }
        close(echo);
        return 0;
    }
    for (long i = 0; i < count; i++) {
        double start = now_s();
        write_all(fd, buf, size);
        read_all(fd, buf, size, spin);
        rtt[i] = (now_s() - start) * 1e6;
    }
    close(fd);
    if (wait_child(pid) != 0) {
        fprintf(stderr, "the echo process failed\n");
        return 1;
    }
    qsort(rtt, (size_t)count, sizeof(double), by_value);
    printf("pingpong spin=%d size=%zu count=%ld: rtt median %.2f us p99 %.2f us\n", spin, size,
           count, rtt[count / 2], rtt[(long)((double)(count - 1) * 0.99)]);
    free(buf);
    free(rtt);
    return 0;
}
