"""A loopfast.Listener serving echo clients in a process of its own, for the load tests
(tests/test_listener_load.py) and the accept probe of the bench: ``python listener_server.py
NOFILE HANDSHAKE_TIMEOUT [aio]``. It prints its port, then serves until a client sends b"stop",
to which it answers with a JSON report: clients served, the exceptions accept() raised by type,
and the CPU seconds it used."""

import asyncio
import json
import resource
import sys
import time

import loopfast
import loopfast.aio


def report(served, errors, started):
    return json.dumps({"served": served, "errors": errors,
                       "cpu": time.process_time() - started}).encode()


def serve_sync(timeout):
    listener = loopfast.Listener(backlog=4096, handshake_timeout=timeout)
    print(listener.address[1], flush=True)
    served, errors, started = 0, {}, time.process_time()
    while True:
        try:
            channel = listener.accept()
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        with channel:
            message = channel.recv_bytes(timeout=30)
            if message == b"stop":
                channel.send_bytes(report(served, errors, started))
                return
            channel.send_bytes(message)
            served += 1


async def serve_aio(timeout):
    listener = await loopfast.aio.start_listener(backlog=4096, handshake_timeout=timeout)
    print(listener.address[1], flush=True)
    served, errors, started = 0, {}, time.process_time()
    while True:
        try:
            channel = await listener.accept()
        except Exception as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            continue
        async with channel:
            message = await asyncio.wait_for(channel.recv_bytes(), 30)
            if message == b"stop":
                await channel.send_bytes(report(served, errors, started))
                return
            await channel.send_bytes(message)
            served += 1


if __name__ == "__main__":
    nofile, timeout = int(sys.argv[1]), float(sys.argv[2])
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    if sys.argv[3:] == ["aio"]:
        asyncio.run(serve_aio(timeout))
    else:
        serve_sync(timeout)
