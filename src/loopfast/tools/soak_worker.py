"""The soak test's worker processes (see soak.py, which starts them and judges the run): the
checked message format, and the Worker, its Sender and Receiver threads."""

import ctypes
import ctypes.util
import gc
import importlib
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
import threading
import time
import traceback
import zlib
from typing import Any, Dict, List, Optional, Tuple

import loopfast
from loopfast import BufferTooShort, Channel, Client, Listener

__all__ = ["Worker", "worker_main"]

MIB = 1024 * 1024
DEFAULT_MAX_SIZE = 16 * MIB
# Why 64 MiB: RSS is sampled with no message in flight, after every buffer the run keeps (the
# payload pool, each sender's scratch buffer, the receive buffers) is allocated and touched, and
# with large blocks given back to the system when freed (_fixed_mmap_threshold): a clean run
# grows by under 1 MiB. 64 MiB is four of the largest messages (16 MiB), room for a buffer a
# channel may keep after a large message; a leak of one payload in a thousand messages, or of
# 100 bytes per message, passes it within minutes.
DEFAULT_RSS_BOUND_MIB = 64
SETUP_TIMEOUT = 60.0  # spawning, connecting and authenticating every process
GRACE = 30.0  # after the deadline: time for the last messages and END markers to arrive
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

# Every message starts with this header: magic, stream, sequence number, payload length, CRC-32
# (of stream, sequence, length, flags, next kind and payload), flags, the kind of the next message
# of this channel direction (when a single thread sends on it), padding. 32 bytes.
MAGIC = b"LFSK"
HEADER = struct.Struct("<4sIQQIBBxx")
CRC_FIELDS = struct.Struct("<IQQBB")
FLAG_END = 1  # the last message of a stream: its sequence number is the number of messages sent
FLAG_PAUSE = 2  # the sender waits for its process's RSS sample after the warm-up
MARKERS = FLAG_END | FLAG_PAUSE  # not data: no sequence number of their own
NEXT_UNKNOWN, NEXT_BYTES, NEXT_OBJECT = 0, 1, 2
OBJECT_MODES = ("pickle", "oob", "numpy")
RECV_INTO_SIZE = MIB + 64  # larger messages take the BufferTooShort path of recv_bytes_into
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter
INJECT_AFTER = 20  # a self-test fault goes into the first eligible message from this number on
INJECTIONS = ("corruption", "loss", "duplicate", "reorder", "kill")

COUNTERS = ("messages_sent", "bytes_sent", "messages", "bytes", "lost", "reordered",
            "duplicated", "corrupted", "errors", "recv_timeouts", "send_timeouts",
            "oob_refusals", "buffer_too_short", "spin_changes")


def _numpy() -> Any:
    try:
        return importlib.import_module("numpy")
    except ImportError:
        return None


def _rss() -> Optional[int]:
    """Resident set size of this process in bytes (Linux /proc), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _fds() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _trim() -> None:
    """Collect garbage and hand free heap memory back to the system, so that RSS samples show
    what is alive rather than what the allocator keeps cached."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every block over 256 KiB with its own mmap(), returned to the system on
    free(). By default the threshold rises up to 32 MiB as large blocks are freed, and the freed
    memory then stays resident in the threads' arenas, where malloc_trim() cannot reach it: the
    RSS would measure the allocator's cache, not what is alive."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):
        pass


def _crc(stream: int, seq: int, payload: memoryview, flags: int, next_kind: int) -> int:
    start = zlib.crc32(CRC_FIELDS.pack(stream, seq, len(payload), flags, next_kind))
    return zlib.crc32(payload, start)


def _header(stream: int, seq: int, payload: memoryview, flags: int, next_kind: int) -> bytes:
    return HEADER.pack(MAGIC, stream, seq, len(payload),
                       _crc(stream, seq, payload, flags, next_kind), flags, next_kind)


def stream_id(link: int, channel: int, role: int, thread: int) -> int:
    """Stream number of sender `thread` on side `role` (0: listening/first end, 1: the other) of
    channel `channel` (0: Pipe, 1: Listener/Client) of link `link`."""
    return ((link * 2 + channel) * 2 + role) * 64 + thread


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high], uniform in log(size + 1)."""
    value = math.exp(rng.uniform(math.log(low + 1), math.log(high + 1))) - 1
    return max(low, min(high, int(value)))


def message_size(rng: random.Random, max_size: int) -> int:
    """0 B to max_size, skewed towards small: 78% up to 4 KiB, 18% up to 1 MiB, 2% above, and 2%
    edge sizes (0, 1, around the header size, 4 KiB, 64 KiB, max_size)."""
    r = rng.random()
    if r < 0.02:
        return min(max_size, rng.choice([0, 1, 31, 32, 33, 4095, 4096, 65536, max_size]))
    if r < 0.80:
        return log_uniform(rng, 0, min(4096, max_size))
    if r < 0.98:
        return log_uniform(rng, min(4096, max_size), min(MIB, max_size))
    return log_uniform(rng, min(MIB, max_size), max_size)


class Worker:
    """One soak process: its channels, sender and receiver threads, counters and reports."""

    def __init__(self, index: int, config: Dict[str, Any], stop_event: Any,
                 reports: Any) -> None:
        self.index = index
        self.config = config
        self.max_size: int = config["max_size"]
        self.stop_event = stop_event
        self.reports = reports
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.apis: Dict[str, int] = {}
        self.error_samples: List[str] = []
        self.rng = random.Random(config["seed"] * 1000 + index)
        self.numpy = _numpy()
        self.actors: List[Any] = []
        self.end_time = math.inf
        self.hard_deadline = math.inf
        self.warm_up_end = math.inf
        # The RSS baseline is sampled with every thread of the process paused (no message in
        # flight): senders pause after the warm-up, receivers once every stream has paused.
        self.resume = threading.Event()
        self.paused = 0
        self.info: Dict[str, Any] = {
            "index": index, "pid": os.getpid(), "implementation": loopfast.implementation,
            "numpy": self.numpy is not None, "phase": "setup",
            "rss_start": None, "rss_end": None, "rss_peak": None,
            "fds_start": None, "fds_end": None, "fds_after_close": None}
        pool_size = max(2 * self.max_size, MIB)
        # The payloads' bytes. Each sender slices a memoryview of its own: slicing one shared
        # memoryview from several threads at once corrupts its export count on free-threaded
        # CPython, which then calls it released (CPython gh-155606).
        self.pool = self.rng.randbytes(pool_size)

    # ---- bookkeeping -------------------------------------------------------------------------

    def count(self, key: str, value: int = 1) -> None:
        with self.lock:
            self.counts[key] += value

    def api(self, name: str, value: int = 1) -> None:
        with self.lock:
            self.apis[name] = self.apis.get(name, 0) + value

    def error(self, where: str, text: Optional[str] = None) -> None:
        """Count an unexpected exception (the one being handled, or `text`) as an error."""
        self.count("errors")
        self.sample(where, traceback.format_exc() if text is None else text)

    def sample(self, where: str, text: str) -> None:
        """Keep the first few problem descriptions for the report."""
        with self.lock:
            if len(self.error_samples) < 3:
                self.error_samples.append(f"worker {self.index}, {where}:\n{text}")

    def report(self, final: bool = False) -> None:
        with self.lock:
            snapshot = {"final": final, "counts": dict(self.counts), "apis": dict(self.apis),
                        "errors": list(self.error_samples), **self.info}
        self.reports.put(snapshot)

    def should_stop(self) -> bool:
        return self.stop.is_set() or time.monotonic() >= self.end_time

    def pause(self) -> None:
        """Called by a thread that has nothing in flight: wait for the RSS sample."""
        with self.lock:
            self.paused += 1
        self.resume.wait(max(0.0, self.hard_deadline - time.monotonic()))

    def long_timeout(self) -> float:
        """Timeout for an operation that should succeed: whatever is left until the hard
        deadline (at least one second), so that no wait is unbounded."""
        return max(1.0, self.hard_deadline - time.monotonic())

    # ---- setup -------------------------------------------------------------------------------

    def connect(self, links: List[Dict[str, Any]]) -> List[Tuple[Dict[str, Any], int, Channel]]:
        """Open the Listener/Client connection of every link; return (link, kind, channel) for
        every channel end of this process (kind 0: Pipe, 1: Listener/Client)."""
        accepted: Dict[int, List[Any]] = {}
        threads = []
        listeners = []
        for link in links:
            if link["role"] != 0:
                continue
            family = "AF_INET6" if link["id"] % 2 and self.config["ipv6"] else "AF_INET"
            listener = Listener(family=family, authkey=link["authkey"],
                                spin=self.rng.choice([None, 0.0, 50.0]))
            listeners.append(listener)
            box: List[Any] = []
            accepted[link["id"]] = box

            def accept(listener: Listener = listener, box: List[Any] = box) -> None:
                try:
                    box.append(listener.accept())
                except BaseException as exc:  # reported by the joining thread
                    box.append(exc)

            thread = threading.Thread(target=accept, daemon=True)
            thread.start()
            threads.append(thread)
            link["pipe"].send_bytes(json.dumps([family, list(listener.address)]).encode())
        ends = []
        for link in links:
            if link["role"] == 1:
                family, address = json.loads(link["pipe"].recv_bytes(timeout=SETUP_TIMEOUT))
                ends.append((link, 1, Client(tuple(address), family, authkey=link["authkey"],
                                             timeout=SETUP_TIMEOUT,
                                             spin=self.rng.choice([None, 0.0, 50.0]))))
        for thread in threads:
            thread.join(SETUP_TIMEOUT)
        for listener in listeners:
            listener.close()
        for link in links:
            if link["role"] == 0:
                box = accepted[link["id"]]
                if not box:
                    raise TimeoutError(f"link {link['id']}: no client within {SETUP_TIMEOUT} s")
                if isinstance(box[0], BaseException):
                    raise box[0]
                ends.append((link, 1, box[0]))
        return [(link, 0, link["pipe"]) for link in links] + ends

    # ---- the run -----------------------------------------------------------------------------

    def run(self, links: List[Dict[str, Any]], go_event: Any) -> None:
        ends: List[Tuple[Dict[str, Any], int, Channel]] = []
        try:
            ends = self.connect(links)
        except BaseException:
            self.error("setup")
            self.info["phase"] = "failed"
            self.report(final=True)
            return
        threads = self.start_threads(ends)
        self.info["phase"] = "ready"
        self.report()
        if not go_event.wait(SETUP_TIMEOUT * 2):
            self.error("setup", "the parent never said go")
            self.stop.set()
        start = time.monotonic()
        duration = self.config["duration"]
        warm_up = min(max(0.1 * duration, 0.5), 30.0)
        self.warm_up_end = start + warm_up
        self.end_time = start + duration
        self.hard_deadline = self.end_time + GRACE
        self.info["phase"] = "running"
        for thread in threads:
            thread.start()
        self.monitor(threads)
        self.info["seconds"] = time.monotonic() - start
        self.finish(ends, threads)

    def monitor(self, threads: List[threading.Thread]) -> None:
        """Take the RSS baseline once every thread has paused (or ended); report every second
        until every thread is done (or the hard deadline passes)."""
        next_report = time.monotonic() + 1.0
        kill = "kill" in self.config["inject"] and self.index == 1
        while any(thread.is_alive() for thread in threads):
            now = time.monotonic()
            if not self.resume.is_set():
                idle = self.paused + sum(not thread.is_alive() for thread in threads)
                if idle >= len(threads) or now >= self.warm_up_end + GRACE:
                    if idle < len(threads):
                        self.sample("warm-up", "RSS baseline taken with threads still busy")
                    _trim()
                    self.info["rss_start"] = _rss()
                    self.info["fds_start"] = _fds()
                    self.info["pause_seconds"] = now - self.warm_up_end
                    self.resume.set()
                    if kill:
                        os._exit(3)  # self-test: a worker that dies is reported, not waited for
            if self.stop_event.is_set():
                self.stop.set()
            if now >= self.hard_deadline:
                break
            if now >= next_report:
                self.report()
                next_report = now + 1.0
            time.sleep(0.05)

    def finish(self, ends: List[Tuple[Dict[str, Any], int, Channel]],
               threads: List[threading.Thread]) -> None:
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            self.error("end", f"threads still running at the hard deadline: {stuck}")
        _trim()
        if self.info["rss_start"] is None:  # stopped before the warm-up ended
            self.info["rss_start"] = _rss()
            self.info["fds_start"] = _fds()
        self.info["rss_end"] = _rss()
        self.info["rss_peak"] = _peak_rss()
        self.info["fds_end"] = _fds()
        self.actors.clear()
        for _, _, channel in ends:
            channel.close()
        for thread in threads:
            thread.join(5.0)  # a receive blocked on a channel closed under it must raise
        self.info["fds_after_close"] = _fds()
        self.info["phase"] = "done"
        self.report(final=True)

    def start_threads(self, ends: List[Tuple[Dict[str, Any], int, Channel]]
                      ) -> List[threading.Thread]:
        """Threads (not started yet): per channel end, one receiver and the senders (one on a
        Pipe, so that the receiver can be told each next message's kind; --threads on a
        Listener/Client connection, all sending at once)."""
        threads = []
        self.actors = []  # kept (with their buffers) until the last RSS sample
        for link, kind, channel in ends:
            role = link["role"]
            senders = 1 if kind == 0 else self.config["threads"]
            streams = [stream_id(link["id"], kind, 1 - role, t) for t in range(senders)]
            receiver = Receiver(self, channel, streams, announced=senders == 1,
                                seed=self.rng.getrandbits(64))
            self.actors.append(receiver)
            threads.append(threading.Thread(
                target=receiver.run, daemon=True,
                name=f"recv link {link['id']} {('pipe', 'client')[kind]}"))
            for t in range(senders):
                inject = None
                if self.index == 0 and link["id"] == 0 and role == 0 and kind == 1 and t == 0:
                    inject = [i for i in self.config["inject"] if i != "kill"]
                sender = Sender(self, channel, stream_id(link["id"], kind, role, t),
                                announce=senders == 1, seed=self.rng.getrandbits(64),
                                inject=inject or [])
                self.actors.append(sender)
                threads.append(threading.Thread(
                    target=sender.run, daemon=True,
                    name=f"send link {link['id']} {('pipe', 'client')[kind]} {t}"))
        return threads


class Sender:
    """Sends one stream: groups of messages through a random API each, then an END message."""

    def __init__(self, worker: Worker, channel: Channel, stream: int, *, announce: bool,
                 seed: int, inject: List[str]) -> None:
        self.worker = worker
        self.channel = channel
        self.stream = stream
        self.announce = announce  # the only sender on this direction: say the next kind
        self.rng = random.Random(seed)
        self.inject = list(inject)
        self.seq = 0
        self.paused = False
        self.scratch = bytearray(worker.max_size + 64)
        self.scratch_view = memoryview(self.scratch)
        self.pool = memoryview(worker.pool)  # this thread's own view (Worker.__init__)
        touched = min(len(self.scratch), len(self.pool))  # allocated for real before warm-up
        self.scratch_view[:touched] = self.pool[:touched]
        self.numpy = worker.numpy

    def run(self) -> None:
        try:
            self.loop()
        except BaseException:
            self.worker.error(f"sender of stream {self.stream}")

    def next_group(self) -> Tuple[str, List[str]]:
        """The next API and the modes of the messages it sends."""
        rng = self.rng
        if self.inject and self.seq >= INJECT_AFTER:
            return "inject " + self.inject.pop(0), ["bytes"]
        if self.worker.should_stop():
            return "end", [rng.choice(["bytes", "pickle"])]
        if not self.paused and time.monotonic() >= self.worker.warm_up_end:
            self.paused = True
            return "pause", [rng.choice(["bytes", "pickle"])]
        choices = ["send_bytes"] * 30 + ["send"] * 35 + ["many"] * 15 + ["batch"] * 15
        if self.announce:
            choices += ["send_timeout"] * 5
        transport = rng.choice(choices)
        if transport == "send":
            modes = ["pickle", "oob"] + (["numpy"] if self.numpy is not None else [])
            return transport, [rng.choice(modes)]
        if transport in ("many", "batch"):
            count = rng.randint(1, 32)
            if transport == "many":
                return transport, ["bytes"] * count
            return transport, [rng.choice(["bytes"] * 4 + ["pickle"]) for _ in range(count)]
        return transport, ["bytes"]

    def next_kind(self, mode: str) -> int:
        if not self.announce:
            return NEXT_UNKNOWN
        return NEXT_OBJECT if mode in OBJECT_MODES else NEXT_BYTES

    def loop(self) -> None:
        current = self.next_group()
        while True:
            if current[0] == "end":
                self.send_group(current, NEXT_BYTES if self.announce else NEXT_UNKNOWN)
                return
            following = self.next_group()
            self.send_group(current, self.next_kind(following[1][0]))
            current = following

    def payload(self, size: int) -> memoryview:
        start = self.rng.randrange(len(self.pool) - size + 1)
        return self.pool[start:start + size]

    def compose(self, size: int, flags: int, next_kind: int) -> Tuple[int, int]:
        """Write the next message (header and payload) into the scratch buffer at a small random
        offset; return (offset, length). Advances the sequence number (not for END)."""
        payload = self.payload(size)
        header = _header(self.stream, self.seq, payload, flags, next_kind)
        if not flags & MARKERS:
            self.seq += 1
        offset = self.rng.randrange(8)
        view = self.scratch_view
        view[offset:offset + HEADER.size] = header
        view[offset + HEADER.size:offset + HEADER.size + size] = payload
        return offset, HEADER.size + size

    def message_object(self, mode: str, size: int, flags: int, next_kind: int) -> Any:
        payload = self.payload(size)
        header = _header(self.stream, self.seq, payload, flags, next_kind)
        if not flags & MARKERS:
            self.seq += 1
        if mode == "pickle":
            return {"h": header, "p": bytes(payload)}
        if mode == "oob":
            return {"h": header, "p": pickle.PickleBuffer(payload)}
        return {"h": header, "p": self.numpy.frombuffer(payload, dtype=self.numpy.uint8)}

    def sent(self, api: str, count: int, size: int) -> None:
        self.worker.api(api)
        self.worker.count("messages_sent", count)
        self.worker.count("bytes_sent", size)

    def send_group(self, group: Tuple[str, List[str]], following: int) -> None:
        transport, modes = group
        worker, channel, rng = self.worker, self.channel, self.rng
        kinds = [self.next_kind(mode) for mode in modes[1:]] + [following]
        if transport in ("end", "pause"):
            flag = FLAG_END if transport == "end" else FLAG_PAUSE
            if modes[0] == "bytes":
                offset, length = self.compose(0, flag, kinds[0])
                channel.send_bytes(self.scratch, offset, length, timeout=worker.long_timeout())
            else:
                channel.send(self.message_object("pickle", 0, flag, kinds[0]),
                             timeout=worker.long_timeout())
            if flag == FLAG_PAUSE:
                worker.pause()
            return
        if transport.startswith("inject "):
            self.send_injected(transport.split()[1], kinds[0])
            return
        if transport == "send_bytes":
            size = message_size(rng, worker.max_size)
            offset, length = self.compose(size, 0, kinds[0])
            channel.send_bytes(self.scratch, offset, length, timeout=worker.long_timeout())
            self.sent("send_bytes", 1, length)
        elif transport == "send_timeout":  # large: more likely to time out part-way
            size = log_uniform(rng, min(65536, worker.max_size), worker.max_size)
            self.send_with_short_timeout(size, kinds[0])
        elif transport == "send":
            size = message_size(rng, worker.max_size)
            channel.send(self.message_object(modes[0], size, 0, kinds[0]),
                         timeout=worker.long_timeout())
            self.sent(f"send({modes[0]})", 1, HEADER.size + size)
        elif transport == "many":
            buffers = []
            for kind in kinds:
                size = message_size(rng, min(worker.max_size, 65536))
                offset, length = self.compose(size, 0, kind)
                buffers.append(bytes(self.scratch_view[offset:offset + length]))
            channel.send_bytes_many(buffers, timeout=worker.long_timeout())
            self.sent("send_bytes_many", len(buffers), sum(len(b) for b in buffers))
        else:
            self.send_batch(modes, kinds)

    def send_batch(self, modes: List[str], kinds: List[int]) -> None:
        """Sends inside batch(); the scratch buffer is reused at once after each send_bytes (a
        batch must have copied a small payload before send_bytes returns)."""
        worker, channel, rng = self.worker, self.channel, self.rng
        total = 0
        with channel.batch(timeout=worker.long_timeout()):
            for mode, kind in zip(modes, kinds):
                size = message_size(rng, worker.max_size)
                if mode == "bytes":
                    offset, length = self.compose(size, 0, kind)
                    channel.send_bytes(self.scratch, offset, length,
                                       timeout=worker.long_timeout())
                else:
                    channel.send(self.message_object(mode, size, 0, kind),
                                 timeout=worker.long_timeout())
                    length = HEADER.size + size
                total += length
        self.sent("batch", len(modes), total)

    def send_with_short_timeout(self, size: int, next_kind: int) -> None:
        """send_bytes with a timeout that may expire part-way: if nothing went out the message
        is sent again; if part of it did, the rest goes out before the next message. Only on a
        direction with a single sender, so that unsent_bytes tells the two cases apart."""
        worker, channel = self.worker, self.channel
        if channel.unsent_bytes:
            channel.flush(timeout=worker.long_timeout())
        offset, length = self.compose(size, 0, next_kind)
        try:
            channel.send_bytes(self.scratch, offset, length,
                               timeout=self.rng.choice([0.0, 0.0002, 0.002]))
        except TimeoutError:
            worker.count("send_timeouts")
            if not channel.unsent_bytes:
                channel.send_bytes(self.scratch, offset, length, timeout=worker.long_timeout())
        self.sent("send_bytes(short timeout)", 1, length)

    def send_injected(self, fault: str, next_kind: int) -> None:
        """Self-test: one deliberate fault in this stream, which the receiver must count."""
        worker, channel = self.worker, self.channel
        size = max(1, message_size(self.rng, min(worker.max_size, 4096)))
        timeout = worker.long_timeout()
        if fault == "loss":
            self.seq += 1
        if fault == "reorder":
            seq = self.seq
            self.seq = seq + 1
            offset, length = self.compose(size, 0, next_kind)
            second = bytes(self.scratch_view[offset:offset + length])
            self.seq = seq
            offset, length = self.compose(size, 0, next_kind)
            channel.send_bytes(second, timeout=timeout)
            channel.send_bytes(self.scratch, offset, length, timeout=timeout)
            self.seq = seq + 2
            self.sent("send_bytes(injected reorder)", 2, 2 * length)
            return
        offset, length = self.compose(size, 0, next_kind)
        if fault == "corruption":
            self.scratch[offset + HEADER.size + size // 2] ^= 0x01
        channel.send_bytes(self.scratch, offset, length, timeout=timeout)
        if fault == "duplicate":
            channel.send_bytes(self.scratch, offset, length, timeout=timeout)
        self.sent(f"send_bytes(injected {fault})", 1, length)


class StreamState:
    __slots__ = ("end", "expected", "missing", "paused")

    def __init__(self) -> None:
        self.expected = 0
        self.missing: set[int] = set()
        self.end: Optional[int] = None
        self.paused = False


class Receiver:
    """Receives the streams of one channel direction through a random API each time and checks
    every message."""

    def __init__(self, worker: Worker, channel: Channel, streams: List[int], *,
                 announced: bool, seed: int) -> None:
        self.worker = worker
        self.channel = channel
        self.streams = {stream: StreamState() for stream in streams}
        self.open = len(streams)  # streams whose END has not arrived
        self.pausing = len(streams)  # streams that have neither paused nor ended
        self.announced = announced
        self.next_kind = NEXT_BYTES
        self.rng = random.Random(seed)
        self.into = bytearray(RECV_INTO_SIZE + 16)
        self.received = 0

    def run(self) -> None:
        worker = self.worker
        failures = 0
        try:
            while self.open:
                if time.monotonic() >= worker.hard_deadline:
                    worker.error("receiver", f"{self.open} streams of {sorted(self.streams)} "
                                 "sent no END before the hard deadline")
                    break
                if self.pausing == 0:  # every stream paused or ended: nothing in flight
                    self.pausing = -1  # only once
                    worker.pause()
                try:
                    self.receive_once()
                except TimeoutError:
                    pass
                except EOFError:
                    worker.error("receiver", "the peer closed the channel before the END of "
                                 f"{self.open} streams")
                    break
                except Exception:
                    worker.error("receiver")
                    failures += 1
                    if self.channel.closed or failures >= 5:
                        break
        finally:
            lost = 0
            for state in self.streams.values():
                lost += len(state.missing)
                if state.end is not None:
                    lost += max(0, state.end - state.expected)
            worker.count("lost", lost)

    def timeout(self) -> Tuple[float, bool]:
        if self.rng.random() < 0.1:  # likely to expire, perhaps in the middle of a message
            return self.rng.choice([0.0, 0.0001, 0.0005, 0.002]), True
        return min(1.0, max(0.0, self.worker.hard_deadline - time.monotonic())), False

    def receive_once(self) -> None:
        worker, channel, rng = self.worker, self.channel, self.rng
        self.received += 1
        if self.received % 500 == 0:
            channel.spin = rng.choice([None, 0.0, 0.0, 20.0, 100.0])
            worker.count("spin_changes")
        timeout, short = self.timeout()
        api = "recv"
        if not (self.announced and self.next_kind == NEXT_OBJECT and rng.random() < 0.7):
            api = rng.choice(["recv_bytes"] * 35 + ["recv_bytes_into"] * 25
                             + ["recv_bytes_many"] * 20 + ["poll"] * 10 + ["wait"] * 10)
        try:
            if api == "recv":
                self.check_object(channel.recv(timeout=timeout))
            elif api == "recv_bytes":
                self.check_bytes(channel.recv_bytes(timeout=timeout))
            elif api == "recv_bytes_into":
                offset = rng.randrange(16)
                try:
                    size = channel.recv_bytes_into(self.into, offset, timeout=timeout)
                except BufferTooShort as exc:
                    worker.count("buffer_too_short")
                    self.check_bytes(exc.args[0])
                else:
                    self.check_bytes(memoryview(self.into)[offset:offset + size])
            elif api == "recv_bytes_many":
                limit = rng.choice([None, 1, 2, 8, 64])
                for data in channel.recv_bytes_many(limit, timeout=timeout):
                    self.check_bytes(data)
            elif api == "poll":
                if channel.poll(timeout):
                    self.check_bytes(channel.recv_bytes(timeout=worker.long_timeout()))
            elif loopfast.wait([channel], timeout):
                self.check_bytes(channel.recv_bytes(timeout=worker.long_timeout()))
            worker.api(api)
        except TimeoutError:
            if short:
                worker.count("recv_timeouts")
            raise
        except OSError as exc:
            # recv_bytes*() leave an object message with out-of-band buffers for recv().
            if type(exc) is not OSError or "recv()" not in str(exc) or channel.closed:
                raise
            worker.count("oob_refusals")
            self.check_object(channel.recv(timeout=worker.long_timeout()))
            worker.api("recv")

    def check_bytes(self, data: Any) -> None:
        view = memoryview(data)
        if view[:4].tobytes() == MAGIC:
            self.check(view[:HEADER.size], view[HEADER.size:])
        elif view[:1].tobytes() == b"\x80":  # an object sent in band: recv_bytes() gives its pickle
            self.check_object(pickle.loads(view))
        else:
            self.corrupted("neither a message nor a pickle")

    def check_object(self, obj: Any) -> None:
        if not isinstance(obj, dict) or set(obj) != {"h", "p"}:
            self.corrupted(f"unexpected object {type(obj).__name__}")
            return
        self.check(memoryview(obj["h"]), memoryview(obj["p"]).cast("B"))

    def corrupted(self, why: str) -> None:
        self.worker.count("corrupted")
        self.worker.sample("receiver", f"corrupted message: {why}")

    def check(self, header: memoryview, payload: memoryview) -> None:
        worker = self.worker
        if len(header) < HEADER.size or header[:4] != MAGIC:
            self.corrupted("bad header")
            return
        _, stream, seq, length, crc, flags, next_kind = HEADER.unpack(header)
        state = self.streams.get(stream)
        if state is None:
            self.corrupted(f"unknown stream {stream}")
            return
        if length != len(payload):
            self.corrupted(f"stream {stream} #{seq}: length {len(payload)}, header says {length}")
        elif crc != _crc(stream, seq, payload, flags, next_kind):
            self.corrupted(f"stream {stream} #{seq}: checksum mismatch")
        self.next_kind = next_kind
        if flags & FLAG_PAUSE:
            if state.paused or state.end is not None:
                worker.count("duplicated")
            else:
                state.paused = True
                self.pausing -= 1
            return
        if flags & FLAG_END:
            if state.end is None:
                state.end = seq
                self.open -= 1
                if not state.paused:
                    self.pausing -= 1
            else:
                worker.count("duplicated")
            return
        worker.count("messages")
        worker.count("bytes", HEADER.size + len(payload))
        if seq == state.expected:
            state.expected += 1
        elif seq > state.expected:
            if seq - state.expected > 1_000_000:
                self.corrupted(f"stream {stream}: jump from #{state.expected} to #{seq}")
                return
            state.missing.update(range(state.expected, seq))
            state.expected = seq + 1
        elif seq in state.missing:
            state.missing.discard(seq)
            worker.count("reordered")
        else:
            worker.count("duplicated")


def worker_main(index: int, config: Dict[str, Any], links: List[Dict[str, Any]],
                 stop_event: Any, go_event: Any, reports: Any) -> None:
    _fixed_mmap_threshold()
    worker = Worker(index, config, stop_event, reports)
    # Ctrl-C reaches every process of the terminal's group: stop sending, finish cleanly.
    signal.signal(signal.SIGINT, lambda signum, frame: worker.stop.set())
    worker.run(links, go_event)
