/* Compiles and links every function of platform.h's Windows branch against Winsock
 * (run by .ci/run: x86_64-w64-mingw32-gcc -Wall -Werror ... -lws2_32). Not shipped. */
#include "platform.h"

PyObject *PyExc_OSError;
PyObject *PyErr_SetFromErrno(PyObject *type) { (void)type; return NULL; }
PyObject *PyErr_SetExcFromWindowsErr(PyObject *type, int ierr) { (void)type; (void)ierr; return NULL; }

int main(void) {
    lf_socket_t s = LF_INVALID_SOCKET;
    char buf[64];
    unsigned char header[16];
    lf_iovec iov[2] = {{buf, sizeof buf}, {header, sizeof header}};
    short revents = 0;
    int err = lf_last_error();
    (void)lf_error_would_block(err);
    (void)lf_error_interrupted(err);
    (void)lf_error_not_socket(err);
    (void)lf_send(s, buf, sizeof buf);
    (void)lf_recv(s, buf, sizeof buf);
    (void)lf_sendv(s, iov, 2);
    (void)lf_peek(s, buf, sizeof buf);
    (void)lf_discard(s, buf, sizeof buf);
    (void)lf_recvv(s, iov, 2);
    {
        uint64_t counter = 0, *shared = lf_shared_ledger_new();
        (void)lf_counter_add(&counter, 1);
        (void)lf_counter_load(&counter);
        lf_shared_ledger_free(shared);
    }
    (void)lf_poll(s, LF_POLLIN | LF_POLLOUT, 0, &revents);
    (void)lf_set_nonblocking(s);
    (void)lf_set_nodelay(s);
    (void)lf_shutdown_both(s);
    (void)lf_close(s);
    (void)lf_monotonic_ns();
    lf_yield();
    lf_nap(1000);
    lf_set_os_error(err);
    lf_store_u64le(header + 8, 1);
    lf_store_u32le(header + 4, (uint32_t)lf_load_u64le(header + 8));
    return (int)lf_load_u32le(header + 4) + LF_IOV_MAX + (int)LF_POLLERR;
}
