/* platform.h: every difference between POSIX and Windows sockets, behind neutral names.
 *
 * The Cython core (channel.pyx) uses only the lf_* names below and never says #ifdef itself.
 * Both branches are compiled by checks: the POSIX one by every build, the Windows one by
 * `.ci/run` with x86_64-w64-mingw32-gcc (see tools/windows/check.sh).
 */
#ifndef LOOPFAST_PLATFORM_H
#define LOOPFAST_PLATFORM_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Whether Python threads run truly in parallel here (a free-threaded, "3.13t", interpreter).
 * Only then can another thread's close() run during a syscall the calling thread makes with
 * its GIL held, so the bookkeeping for that (_enter_fd_held() in base.pxi) compiles away
 * otherwise. */
#ifdef Py_GIL_DISABLED
#define LF_FREE_THREADED 1
#else
#define LF_FREE_THREADED 0
#endif

#ifdef _WIN32
/* ------------------------------------------------------------------ Windows (Winsock 2) */
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>

typedef SOCKET lf_socket_t;
#define LF_INVALID_SOCKET INVALID_SOCKET
#define LF_POLLIN POLLRDNORM
#define LF_POLLOUT POLLWRNORM
#define LF_POLLERR (POLLERR | POLLHUP | POLLNVAL)
/* Windows has no IOV_MAX; WSASend takes any count. Keep the same batch size as Linux. */
#define LF_IOV_MAX 1024
/* One WSASend/recv moves at most INT_MAX bytes; larger requests are clamped (a short write). */
#define LF_IO_CHUNK_MAX ((size_t)0x7fffffff)

typedef struct { void *base; size_t len; } lf_iovec;

static inline int lf_last_error(void) { return WSAGetLastError(); }
static inline int lf_error_would_block(int err) {
    return err == WSAEWOULDBLOCK || err == WSAEINPROGRESS;
}
static inline int lf_error_interrupted(int err) { return err == WSAEINTR; }
static inline int lf_error_not_socket(int err) { return err == WSAENOTSOCK; }

static inline Py_ssize_t lf_send(lf_socket_t s, const char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    int n = send(s, buf, (int)len, 0);
    return n == SOCKET_ERROR ? -1 : (Py_ssize_t)n;
}

static inline Py_ssize_t lf_recv(lf_socket_t s, char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    int n = recv(s, buf, (int)len, 0);
    return n == SOCKET_ERROR ? -1 : (Py_ssize_t)n;
}

/* Copy queued bytes without consuming them (the channel's knowledge of what is queued). */
static inline Py_ssize_t lf_peek(lf_socket_t s, char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    int n = recv(s, buf, (int)len, MSG_PEEK);
    return n == SOCKET_ERROR ? -1 : (Py_ssize_t)n;
}

/* Consume `len` bytes already known (peeked) to be queued. Winsock has no discarding receive:
 * they are received into `buf`, which holds the same bytes already. */
static inline Py_ssize_t lf_discard(lf_socket_t s, char *buf, size_t len) {
    return lf_recv(s, buf, len);
}

/* Scatter read into several buffers: one WSARecv. */
static inline Py_ssize_t lf_recvv(lf_socket_t s, const lf_iovec *iov, int count) {
    WSABUF bufs[LF_IOV_MAX];
    DWORD received = 0, flags = 0;
    size_t total = 0;
    int i;
    if (count > LF_IOV_MAX) count = LF_IOV_MAX;
    for (i = 0; i < count; i++) {
        size_t len = iov[i].len;
        if (len > LF_IO_CHUNK_MAX - total) len = LF_IO_CHUNK_MAX - total;
        bufs[i].buf = (char *)iov[i].base;
        bufs[i].len = (ULONG)len;
        total += len;
        if (total >= LF_IO_CHUNK_MAX) { i++; break; }
    }
    if (WSARecv(s, bufs, (DWORD)i, &received, &flags, NULL, NULL) == SOCKET_ERROR) return -1;
    return (Py_ssize_t)received;
}

/* Gather write: WSABUF is {ULONG len; char *buf}, the reverse of struct iovec. */
static inline Py_ssize_t lf_sendv(lf_socket_t s, const lf_iovec *iov, int count) {
    WSABUF bufs[LF_IOV_MAX];
    DWORD sent = 0;
    size_t total = 0;
    int i;
    if (count > LF_IOV_MAX) count = LF_IOV_MAX;
    for (i = 0; i < count; i++) {
        size_t len = iov[i].len;
        if (len > LF_IO_CHUNK_MAX - total) len = LF_IO_CHUNK_MAX - total;
        bufs[i].buf = (char *)iov[i].base;
        bufs[i].len = (ULONG)len;
        total += len;
        if (total >= LF_IO_CHUNK_MAX) { i++; break; }
    }
    if (WSASend(s, bufs, (DWORD)i, &sent, 0, NULL, NULL) == SOCKET_ERROR) return -1;
    return (Py_ssize_t)sent;
}

/* Readiness wait on one socket. Returns >0 ready, 0 timed out, -1 error (see lf_last_error). */
static inline int lf_poll(lf_socket_t s, short events, int timeout_ms, short *revents) {
    WSAPOLLFD p;
    int rc;
    p.fd = s;
    p.events = events;
    p.revents = 0;
    rc = WSAPoll(&p, 1, timeout_ms);
    *revents = p.revents;
    return rc == SOCKET_ERROR ? -1 : rc;
}

static inline int lf_set_nonblocking(lf_socket_t s) {
    u_long on = 1;
    return ioctlsocket(s, FIONBIO, &on) == SOCKET_ERROR ? -1 : 0;
}

static inline int lf_close(lf_socket_t s) { return closesocket(s) == SOCKET_ERROR ? -1 : 0; }
/* Let another runnable thread on this CPU go first (used between busy-poll checks). */
static inline void lf_yield(void) { SwitchToThread(); }
/* A short sleep off every wait queue. Windows sleeps in whole timer ticks (1-15 ms), far too
 * long: a yield instead. */
static inline void lf_nap(int64_t ns) { (void)ns; SwitchToThread(); }
static inline int lf_set_nodelay(lf_socket_t s) {
    BOOL on = TRUE;
    return setsockopt(s, IPPROTO_TCP, TCP_NODELAY, (const char *)&on, sizeof(on)) == SOCKET_ERROR ? -1 : 0;
}
static inline int lf_shutdown_both(lf_socket_t s) { return shutdown(s, SD_BOTH); }

/* Monotonic clock in nanoseconds. */
static inline int64_t lf_monotonic_ns(void) {
    static LARGE_INTEGER freq;
    LARGE_INTEGER now;
    if (freq.QuadPart == 0) QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&now);
    return (int64_t)((double)now.QuadPart * 1e9 / (double)freq.QuadPart);
}

/* Two counters shared with the processes this one forks: Windows has no fork(), so there are
 * none (a channel handed to another process is marked shared instead). */
static inline uint64_t *lf_shared_ledger_new(void) { return NULL; }
static inline void lf_shared_ledger_free(uint64_t *p) { (void)p; }
static inline uint64_t lf_counter_load(uint64_t *p) {
    return (uint64_t)InterlockedCompareExchange64((volatile LONG64 *)p, 0, 0);
}
static inline uint64_t lf_counter_add(uint64_t *p, uint64_t n) {
    return (uint64_t)InterlockedExchangeAdd64((volatile LONG64 *)p, (LONG64)n) + n;
}
/* A hint shared by threads under no lock (the spin state): a plain aligned access, which the
   volatile keeps the compiler from tearing, caching or reordering away (MSVC, x64 and ARM64). */
static inline int lf_relaxed_load_int(int *p) { return *(volatile int *)p; }
static inline void lf_relaxed_store_int(int *p, int v) { *(volatile int *)p = v; }

/* Sets the matching OSError subclass (ConnectionResetError, ...) for a Winsock error code. */
static inline void lf_set_os_error(int err) { PyErr_SetExcFromWindowsErr(PyExc_OSError, err); }

#else
/* ------------------------------------------------------------------ POSIX */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

typedef int lf_socket_t;
#define LF_INVALID_SOCKET (-1)
#define LF_POLLIN POLLIN
#define LF_POLLOUT POLLOUT
#define LF_POLLERR (POLLERR | POLLHUP | POLLNVAL)
#ifdef IOV_MAX
#define LF_IOV_MAX IOV_MAX
#else
#define LF_IOV_MAX 1024
#endif
/* Linux moves at most 0x7ffff000 bytes per call anyway; clamping keeps ssize_t arithmetic safe. */
#define LF_IO_CHUNK_MAX ((size_t)0x7ffff000)

/* MSG_NOSIGNAL: a write to a peer that has gone raises EPIPE instead of killing us with SIGPIPE.
 * macOS lacks it but Python ignores SIGPIPE at start-up, which has the same effect. */
#ifdef MSG_NOSIGNAL
#define LF_SEND_FLAGS MSG_NOSIGNAL
#else
#define LF_SEND_FLAGS 0
#endif

typedef struct { void *base; size_t len; } lf_iovec;

static inline int lf_last_error(void) { return errno; }
static inline int lf_error_would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK; }
static inline int lf_error_interrupted(int err) { return err == EINTR; }
static inline int lf_error_not_socket(int err) { return err == ENOTSOCK || err == EBADF; }

static inline Py_ssize_t lf_send(lf_socket_t s, const char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    return (Py_ssize_t)send(s, buf, len, LF_SEND_FLAGS);
}

static inline Py_ssize_t lf_recv(lf_socket_t s, char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    return (Py_ssize_t)recv(s, buf, len, 0);
}

/* Copy queued bytes without consuming them (the channel's knowledge of what is queued). */
static inline Py_ssize_t lf_peek(lf_socket_t s, char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
    return (Py_ssize_t)recv(s, buf, len, MSG_PEEK);
}

/* Consume `len` bytes already known (peeked) to be queued. Linux discards them without copying
 * (MSG_TRUNC on a TCP socket); elsewhere they are received into `buf`, which holds the same
 * bytes already. */
static inline Py_ssize_t lf_discard(lf_socket_t s, char *buf, size_t len) {
    if (len > LF_IO_CHUNK_MAX) len = LF_IO_CHUNK_MAX;
#if defined(__linux__) && defined(MSG_TRUNC)
    return (Py_ssize_t)recv(s, buf, len, MSG_TRUNC);
#else
    return (Py_ssize_t)recv(s, buf, len, 0);
#endif
}

/* Scatter read into several buffers: one recvmsg. */
static inline Py_ssize_t lf_recvv(lf_socket_t s, const lf_iovec *iov, int count) {
    struct iovec vec[LF_IOV_MAX];
    struct msghdr msg;
    size_t total = 0;
    int i;
    if (count > LF_IOV_MAX) count = LF_IOV_MAX;
    for (i = 0; i < count; i++) {
        size_t len = iov[i].len;
        if (len > LF_IO_CHUNK_MAX - total) len = LF_IO_CHUNK_MAX - total;
        vec[i].iov_base = iov[i].base;
        vec[i].iov_len = len;
        total += len;
        if (total >= LF_IO_CHUNK_MAX) { i++; break; }
    }
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = vec;
    msg.msg_iovlen = i;
    return (Py_ssize_t)recvmsg(s, &msg, 0);
}

/* Gather write with sendmsg (not writev) so that MSG_NOSIGNAL applies. lf_iovec has the same
 * layout as struct iovec ({base, len}); the copy below is what keeps that an assumption the
 * compiler checks rather than a cast. */
static inline Py_ssize_t lf_sendv(lf_socket_t s, const lf_iovec *iov, int count) {
    struct iovec vec[LF_IOV_MAX];
    struct msghdr msg;
    size_t total = 0;
    int i;
    if (count > LF_IOV_MAX) count = LF_IOV_MAX;
    for (i = 0; i < count; i++) {
        size_t len = iov[i].len;
        if (len > LF_IO_CHUNK_MAX - total) len = LF_IO_CHUNK_MAX - total;
        vec[i].iov_base = iov[i].base;
        vec[i].iov_len = len;
        total += len;
        if (total >= LF_IO_CHUNK_MAX) { i++; break; }
    }
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = vec;
    msg.msg_iovlen = i;
    return (Py_ssize_t)sendmsg(s, &msg, LF_SEND_FLAGS);
}

static inline int lf_poll(lf_socket_t s, short events, int timeout_ms, short *revents) {
    struct pollfd p;
    int rc;
    p.fd = s;
    p.events = events;
    p.revents = 0;
    rc = poll(&p, 1, timeout_ms);
    *revents = p.revents;
    return rc;
}

static inline int lf_set_nonblocking(lf_socket_t s) {
    int flags = fcntl(s, F_GETFL, 0);
    if (flags < 0) return -1;
    return fcntl(s, F_SETFL, flags | O_NONBLOCK) < 0 ? -1 : 0;
}

static inline int lf_close(lf_socket_t s) { return close(s); }
/* Let another runnable thread on this CPU go first (used between busy-poll checks). */
static inline void lf_yield(void) { sched_yield(); }
/* A short sleep off every wait queue (see Channel._await_data). */
static inline void lf_nap(int64_t ns) {
    struct timespec t;
    t.tv_sec = (time_t)(ns / 1000000000);
    t.tv_nsec = (long)(ns % 1000000000);
    nanosleep(&t, NULL);
}
static inline int lf_set_nodelay(lf_socket_t s) {
    int on = 1;
    return setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
}
static inline int lf_shutdown_both(lf_socket_t s) { return shutdown(s, SHUT_RDWR); }

static inline int64_t lf_monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + (int64_t)t.tv_nsec;
}

/* Two counters in memory shared with the processes this one forks: a channel's ledger of what
 * the copies of it in all of them delivered from one socket (see Channel._deliver). NULL if
 * the mapping fails. */
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif
static inline uint64_t *lf_shared_ledger_new(void) {
    void *p = mmap(NULL, 2 * sizeof(uint64_t), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                   -1, 0);
    return p == MAP_FAILED ? NULL : (uint64_t *)p;
}
static inline void lf_shared_ledger_free(uint64_t *p) {
    if (p != NULL) munmap(p, 2 * sizeof(uint64_t));
}
static inline uint64_t lf_counter_load(uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t lf_counter_add(uint64_t *p, uint64_t n) {
    return __atomic_add_fetch(p, n, __ATOMIC_ACQ_REL);
}
/* A hint shared by threads under no lock (the spin state): relaxed atomics, which cost what a
   plain access costs and are no data race for the compiler or ThreadSanitizer. */
static inline int lf_relaxed_load_int(int *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void lf_relaxed_store_int(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

/* Sets the matching OSError subclass (ConnectionResetError, BrokenPipeError, ...) for errno. */
static inline void lf_set_os_error(int err) {
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
}
#endif

/* ------------------------------------------------------------------ both */

/* Frame header fields are little-endian on the wire whatever the host is (docs/protocol.md). */
static inline void lf_store_u64le(unsigned char *p, uint64_t v) {
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline uint64_t lf_load_u64le(const unsigned char *p) {
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static inline void lf_store_u32le(unsigned char *p, uint32_t v) {
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline uint32_t lf_load_u32le(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

#endif /* LOOPFAST_PLATFORM_H */
