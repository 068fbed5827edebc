/* loopfast's stream floor: the message rate and bandwidth plain C reaches sending COUNT
 * SIZE-byte messages over TCP 127.0.0.1 to another process, BATCH messages per send() (1: one
 * send() per message, the per-syscall floor; 1000: the batching floor).
 *
 *     stream SIZE COUNT BATCH
 *
 * prints "stream size=N count=C batch=B: R msg/s G GB/s", timed from the first send to the
 * receiver's acknowledgement of the last byte. */
#include "loopback.h"

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SIZE COUNT BATCH\n", argv[0]);
        return 2;
    }
    size_t size = (size_t)strtoul(argv[1], NULL, 10);
    long count = atol(argv[2]);
    long batch = atol(argv[3]);
    if (size == 0 || count < 1 || batch < 1) {
        fprintf(stderr, "SIZE, COUNT and BATCH must be positive\n");
        return 2;
    }
    if (batch > count) batch = count;
    size_t chunk = size * (size_t)batch;
    char *buf = malloc(chunk < (1u << 20) ? (1u << 20) : chunk);
    if (buf == NULL) die("malloc");
    memset(buf, 'x', chunk);
    pid_t pid;
    int peer;
    int fd = loopback_pair(&pid, &peer);
    if (fd < 0) {  /* the child: take every byte, then say so with one */
        size_t left = size * (size_t)count, room = chunk < (1u << 20) ? (1u << 20) : chunk;
        while (left > 0) {
            ssize_t got = recv(peer, buf, left < room ? left : room, 0);
            if (got > 0) left -= (size_t)got;
            else if (got < 0 && errno == EINTR) continue;
            else die("recv");
        }
        write_all(peer, "k", 1);
        close(peer);
        return 0;
    }
    double start = now_s();
    for (long sent = 0; sent < count; sent += batch) {
        long n = count - sent < batch ? count - sent : batch;
        write_all(fd, buf, size * (size_t)n);
    }
    char ack;
    read_all(fd, &ack, 1, 0);
    double seconds = now_s() - start;
    close(fd);
    if (wait_child(pid) != 0) {
        fprintf(stderr, "the receiving process failed\n");
        return 1;
    }
    printf("stream size=%zu count=%ld batch=%ld: %.0f msg/s %.3f GB/s\n", size, count, batch,
           (double)count / seconds, (double)size * (double)count / seconds / 1e9);
    free(buf);
    return 0;
}
