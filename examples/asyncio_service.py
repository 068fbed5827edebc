"""An asyncio service with plain synchronous clients.

The service is one asyncio task per connection, on ``loopfast.aio``: it listens on 127.0.0.1
with an authkey, and keeps a table of counters that its clients increment and read. Its clients
know nothing of asyncio: each is a plain ``loopfast.Client`` with blocking ``send()`` /
``recv()``, some in child processes and some in threads, all connected at once. The wire
protocol is the same, so sync and async ends talk to each other. A client with the wrong key is
refused before anything it sends is read (``AuthenticationError`` on both sides), and the service
goes on serving the others.

Run it::

    python examples/asyncio_service.py                          # 4 clients, 100 requests each
    python examples/asyncio_service.py --clients 20 --requests 1000

It prints one line, such as ``service ok: 4 clients (2 processes, 2 threads) x 100 requests,
total 400, 1 wrong key refused``, and exits 0 when every count is right.
"""

import argparse
import asyncio
import multiprocessing
import os
import sys
import threading

import loopfast
import loopfast.aio

TIMEOUT = 30.0  # seconds: no wait in this example is unbounded


# ---- the service (asyncio) ----------------------------------------------------------------------

class CounterService:
    """Counters by name. Requests: ("incr", name, n) -> the new value; ("get", name) -> the
    value. No lock: one task runs at a time, and none awaits between reading and writing."""

    def __init__(self) -> None:
        self.counters: dict = {}
        self.refused = 0  # connections turned away for a wrong key
        self.a_refusal = asyncio.Event()  # set at the first one
        self.handlers: list = []  # one task per connection

    async def accept_forever(self, listener: loopfast.aio.Listener) -> None:
        while True:
            try:
                channel = await listener.accept()  # the handshake and key check run here
            except loopfast.AuthenticationError:
                self.refused += 1  # a wrong key: nothing the client sent was read
                self.a_refusal.set()
                continue
            except (loopfast.ProtocolError, TimeoutError):
                continue  # not a loopfast client, or one too slow to finish the handshake
            self.handlers.append(asyncio.create_task(self.handle(channel)))

    async def handle(self, channel: loopfast.aio.AsyncChannel) -> None:
        """Serve one client until it disconnects."""
        async with channel:
            async for request in channel:  # ends when the client closes its end
                if request[0] == "incr":
                    _, name, amount = request
                    self.counters[name] = self.counters.get(name, 0) + amount
                    await channel.send(self.counters[name])
                elif request[0] == "get":
                    await channel.send(self.counters.get(request[1], 0))
                else:
                    await channel.send(("error", f"unknown request {request!r}"))


# ---- the clients (plain, blocking) -------------------------------------------------------------

def client(address, authkey: bytes, name: str, requests: int) -> None:
    """A synchronous client: `requests` increments of its own counter and of the shared one."""
    with loopfast.Client(address, authkey=authkey, timeout=TIMEOUT) as channel:
        for _ in range(requests):
            channel.send(("incr", "total", 1))
            channel.recv(timeout=TIMEOUT)
            channel.send(("incr", name, 1))
            channel.recv(timeout=TIMEOUT)
        channel.send(("get", name))
        mine = channel.recv(timeout=TIMEOUT)
    if mine != requests:
        raise RuntimeError(f"{name}: counted {mine}, expected {requests}")


def intruder(address) -> None:
    """A client with the wrong key: loopfast refuses it during the handshake."""
    try:
        loopfast.Client(address, authkey=b"not the key", timeout=TIMEOUT).close()
    except loopfast.AuthenticationError:
        return
    raise RuntimeError("a client with the wrong key was let in")


# ---- putting it together -------------------------------------------------------------------------

async def run(clients: int, requests: int) -> tuple:
    authkey = os.urandom(32)  # shared with the clients; in real life, from your configuration
    service = CounterService()
    async with await loopfast.aio.start_listener(authkey=authkey) as listener:
        address = listener.address
        accepting = asyncio.create_task(service.accept_forever(listener))
        processes = [multiprocessing.Process(target=client,
                                             args=(address, authkey, f"process-{i}", requests))
                     for i in range(clients // 2)]
        threads = [threading.Thread(target=client,
                                    args=(address, authkey, f"thread-{i}", requests))
                   for i in range(clients - len(processes))]
        threads.append(threading.Thread(target=intruder, args=(address,)))
        for worker in processes + threads:  # processes first: never fork with threads running
            worker.start()
        # Wait for the clients to finish without blocking the event loop, which serves them.
        await asyncio.to_thread(join_all, processes + threads)
        # The intruder may learn of its refusal (the service's proof does not match its key)
        # before the service has checked its proof in turn: wait for the service's verdict.
        await asyncio.wait_for(service.a_refusal.wait(), TIMEOUT)
        accepting.cancel()
        # Every client has closed its connection: each handler ends at its EOF.
        await asyncio.wait_for(asyncio.gather(*service.handlers), TIMEOUT)
    failed = [p.name for p in processes if p.exitcode != 0]
    if failed:
        raise SystemExit(f"client processes failed: {failed}")
    return service, len(processes), len(threads) - 1


def join_all(workers) -> None:
    for worker in workers:
        worker.join(TIMEOUT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="clients (default 4)")
    parser.add_argument("--requests", type=int, default=100,
                        help="increments per client (default 100)")
    args = parser.parse_args(argv)

    service, processes, threads = asyncio.run(run(args.clients, args.requests))
    total = service.counters.get("total", 0)
    if total != args.clients * args.requests or service.refused != 1:
        print(f"service FAILED: total {total}, expected {args.clients * args.requests}; "
              f"{service.refused} refused, expected 1")
        return 1
    print(f"service ok: {args.clients} clients ({processes} processes, {threads} threads) "
          f"x {args.requests} requests, total {total}, {service.refused} wrong key refused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
