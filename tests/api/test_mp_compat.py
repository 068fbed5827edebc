"""Drop-in compatibility with multiprocessing.connection: the same program runs unchanged with
either module, loopfast's exceptions are caught by multiprocessing's except clauses, and misuse
raises the same exception types with the same messages as a real multiprocessing.Pipe."""

import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import pickle
from array import array
from concurrent.futures import ThreadPoolExecutor

import pytest

import loopfast

pytestmark = pytest.mark.timeout(120)

MODULES = {"multiprocessing": multiprocessing.connection, "loopfast": loopfast}


# ---- one program, written against multiprocessing -----------------------------------------------


def _pipe_worker(conn):
    """The child half of the program: plain multiprocessing.connection code."""
    while True:
        obj = conn.recv()
        if obj is None:
            break
        conn.send(obj * 2)
    buf = array("i", [0] * 8)
    n = conn.recv_bytes_into(buf)
    sliced = conn.recv_bytes()
    conn.send((n, buf.tolist(), sliced))
    conn.send_bytes(array("i", [7, 8]))
    conn.send_bytes(b"too long for two")
    conn.send_bytes(b"bye")
    conn.close()


def _client_worker(module_name, address, authkey):
    conn_module = importlib.import_module(module_name)
    with conn_module.Client(address, authkey=authkey) as conn:
        conn.send("hello from client")
        if conn.recv() == "welcome":
            conn.send_bytes(b"thanks")


def _program(conn_module, module_name, method):
    """A small program using Pipe, Process, send/recv, poll, recv_bytes_into with an array,
    BufferTooShort, EOF and Listener/Client with an authkey. Returns what it observed."""
    ctx = multiprocessing.get_context(method)
    seen = []

    parent_end, child_end = conn_module.Pipe()
    worker = ctx.Process(target=_pipe_worker, args=(child_end,))
    worker.start()
    child_end.close()
    for obj in (21, "ab", [1, 2]):
        parent_end.send(obj)
        assert parent_end.poll(60)
        seen.append(parent_end.recv())
    parent_end.send(None)
    parent_end.send_bytes(array("i", [1, 2, 3, 4]))
    parent_end.send_bytes(b"0123456789", 2, 5)
    assert parent_end.poll(60)
    seen.append(parent_end.recv())
    buf = array("i", [0] * 6)
    assert parent_end.poll(60)
    seen.append((parent_end.recv_bytes_into(buf, 8), buf.tolist()))
    assert parent_end.poll(60)
    try:
        parent_end.recv_bytes_into(bytearray(2))
    except multiprocessing.BufferTooShort as exc:
        seen.append(("too short", exc.args[0]))
    assert parent_end.poll(60)
    seen.append(parent_end.recv_bytes())
    worker.join(60)
    seen.append(worker.exitcode)
    assert parent_end.poll(60)
    try:
        parent_end.recv()
    except EOFError:
        seen.append("EOF")
    parent_end.close()
    seen.append(parent_end.closed)

    with conn_module.Listener(("127.0.0.1", 0), authkey=b"secret") as listener:
        client = ctx.Process(target=_client_worker,
                             args=(module_name, listener.address, b"secret"))
        client.start()
        with listener.accept() as conn:
            seen.append(listener.last_accepted[0])
            seen.append(conn.recv())
            conn.send("welcome")
            seen.append(conn.recv_bytes())
        client.join(60)
        seen.append(client.exitcode)
    return seen


EXPECTED = [
    42, "abab", [1, 2, 1, 2],
    (16, [1, 2, 3, 4, 0, 0, 0, 0], b"23456"),
    (8, [0, 0, 7, 8, 0, 0]),
    ("too short", b"too long for two"),
    b"bye", 0, "EOF", True,
    "127.0.0.1", "hello from client", b"thanks", 0,
]


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("module_name", MODULES)
def test_multiprocessing_program_runs_unchanged(module_name, method):
    """Run against multiprocessing too, so the program itself is known to be right."""
    name = "multiprocessing.connection" if module_name == "multiprocessing" else "loopfast"
    assert _program(MODULES[module_name], name, method) == EXPECTED


def test_loopfast_exports_multiprocessing_connection_names():
    for name in ("Pipe", "Listener", "Client", "wait", "AuthenticationError", "BufferTooShort"):
        assert hasattr(loopfast, name), name
    assert loopfast.connection.Connection is loopfast.Channel


# ---- exceptions caught by multiprocessing's except clauses --------------------------------------


def test_buffer_too_short_is_caught_as_multiprocessing_buffer_too_short():
    a, b = loopfast.Pipe()
    with a, b:
        a.send_bytes(b"hello")
        try:
            b.recv_bytes_into(bytearray(2), timeout=10)
        except multiprocessing.BufferTooShort as exc:
            caught = exc
        assert isinstance(caught, loopfast.BufferTooShort)
        assert isinstance(caught, multiprocessing.connection.BufferTooShort)
        assert caught.args[0] == b"hello"


def test_authentication_error_is_caught_as_multiprocessing_authentication_error():
    caught = []
    with loopfast.Listener(authkey=b"right") as listener:

        def connect():
            try:
                loopfast.Client(listener.address, authkey=b"wrong", timeout=30)
            except multiprocessing.AuthenticationError as exc:
                caught.append(exc)

        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(connect)
            try:
                listener.accept()
            except multiprocessing.AuthenticationError as exc:
                caught.append(exc)
            done.result(timeout=30)
    assert len(caught) == 2
    assert all(isinstance(exc, loopfast.AuthenticationError) for exc in caught)
    assert all(isinstance(exc, multiprocessing.connection.AuthenticationError) for exc in caught)


def test_protocol_error_is_an_oserror():
    """Code that catches OSError around multiprocessing connections also catches it."""
    assert issubclass(loopfast.ProtocolError, ConnectionError)
    assert issubclass(loopfast.ProtocolError, OSError)


def test_loopfast_exceptions_pickle():
    for exc in (loopfast.BufferTooShort(b"msg"), loopfast.AuthenticationError("no"),
                loopfast.ProtocolError("bad")):
        clone = pickle.loads(pickle.dumps(exc))
        assert type(clone) is type(exc)
        assert clone.args == exc.args


# ---- Pipe(duplex=False) -----------------------------------------------------------------------


def _one_way(pipe):
    reader, writer = pipe(duplex=False)
    with reader, writer:
        writer.send_bytes(b"down")
        return (reader.readable, reader.writable, writer.readable, writer.writable,
                reader.recv_bytes())


def test_one_way_pipe_directions_match_multiprocessing():
    expected = _one_way(multiprocessing.Pipe)
    assert expected == (True, False, False, True, b"down")
    assert _one_way(loopfast.Pipe) == expected


def test_one_way_pipe_positional_duplex_argument():
    reader, writer = loopfast.Pipe(False)
    with reader, writer:
        assert reader.readable and not reader.writable
        assert writer.writable and not writer.readable


# ---- misuse: same exception types and messages as multiprocessing.Pipe ---------------------------


def _outcome(call, compare_message=True):
    try:
        result = call()
    except Exception as exc:
        kind = next(cls for cls in type(exc).__mro__
                    if cls.__module__ in ("builtins", "multiprocessing.context"))
        return (kind.__name__, str(exc) if compare_message else None)
    return ("ok", result)


def _send_bytes_bad_offsets(pipe):
    a, b = pipe()
    calls = [
        lambda: a.send_bytes(b"abc", -1),
        lambda: a.send_bytes(b"abc", 4),
        lambda: a.send_bytes(b"abc", 0, -1),
        lambda: a.send_bytes(b"abc", 1, 3),
        lambda: a.send_bytes(array("i", [1, 2]), 9),
        lambda: a.send_bytes(array("i", [1, 2]), 4, 5),
    ]
    return [_outcome(call) for call in calls] + [_outcome(lambda: b.poll())]


def _send_bytes_offsets_are_in_bytes(pipe):
    a, b = pipe()
    return [
        _outcome(lambda: a.send_bytes(array("i", [1, 2, 3]), 4, 4)),
        _outcome(lambda: b.recv_bytes()),
        _outcome(lambda: a.send_bytes(array("i", [1, 2, 3]), 8)),
        _outcome(lambda: b.recv_bytes()),
        _outcome(lambda: a.send_bytes(b"abcdef", 2)),
        _outcome(lambda: b.recv_bytes()),
        _outcome(lambda: a.send_bytes(b"abcdef", 6)),
        _outcome(lambda: b.recv_bytes()),
    ]


def _recv_bytes_into_bad_offsets(pipe):
    a, b = pipe()
    a.send_bytes(b"kept")
    return [
        _outcome(lambda: b.recv_bytes_into(bytearray(4), -1)),
        _outcome(lambda: b.recv_bytes_into(bytearray(4), 5)),
        _outcome(lambda: b.recv_bytes_into(array("i", [0, 0]), 9)),
        _outcome(lambda: b.recv_bytes()),  # the bad calls consumed nothing
    ]


def _recv_bytes_into_offsets(pipe):
    a, b = pipe()
    for payload in (b"abc", b"12345", b"xyz"):
        a.send_bytes(payload)
    buf = bytearray(b"........")
    ints = array("i", [0, 0, 0])
    return [
        _outcome(lambda: b.recv_bytes_into(buf, 3)),
        bytes(buf),
        _outcome(lambda: b.recv_bytes_into(buf, 3)),  # exactly fills the buffer
        bytes(buf),
        _outcome(lambda: b.recv_bytes_into(buf, 6)),  # one byte short
        bytes(buf),
        _outcome(lambda: a.send_bytes(array("i", [5, 6]))),
        _outcome(lambda: b.recv_bytes_into(ints, 4)),
        ints.tolist(),
    ]


def _negative_maxlength(pipe):
    _a, b = pipe()
    return [_outcome(lambda: b.recv_bytes(-1))]


def _closed_handle(pipe):
    _a, b = pipe()
    b.close()
    calls = [
        lambda: b.send(1),
        lambda: b.send_bytes(b"x"),
        lambda: b.send_bytes(b"x", -1),
        lambda: b.recv(),
        lambda: b.recv_bytes(),
        lambda: b.recv_bytes_into(bytearray(1)),
        lambda: b.recv_bytes_into(bytearray(1), -1),
        lambda: b.poll(),
        lambda: b.poll(1),
        lambda: b.fileno(),
        lambda: b.close(),  # a second close is harmless
        lambda: b.closed,
    ]
    return [_outcome(call) for call in calls]


def _closed_handle_negative_maxlength(pipe):
    _a, b = pipe()
    b.close()
    return [_outcome(lambda: b.recv_bytes(-1))]


def _wrong_direction(pipe):
    reader, writer = pipe(duplex=False)
    calls = [
        lambda: reader.send(1),
        lambda: reader.send_bytes(b"x"),
        lambda: reader.send_bytes(b"x", -1),
        lambda: writer.recv(),
        lambda: writer.recv_bytes(),
        lambda: writer.recv_bytes_into(bytearray(1)),
        lambda: writer.recv_bytes_into(bytearray(1), -1),
        lambda: writer.poll(),
    ]
    return [_outcome(call) for call in calls]


def _wrong_direction_negative_maxlength(pipe):
    _reader, writer = pipe(duplex=False)
    return [_outcome(lambda: writer.recv_bytes(-1))]


def _maxlength_exceeded_duplex(pipe):
    a, b = pipe()
    a.send_bytes(b"x" * 10)
    return [
        _outcome(lambda: b.recv_bytes(5)),
        _outcome(lambda: b.closed),
        _outcome(lambda: b.readable),
        # the same OSError; loopfast's message adds why after multiprocessing's words
        # (tests/core/test_twin.py checks it)
        _outcome(lambda: b.recv_bytes(), compare_message=False),
        _outcome(lambda: b.send_bytes(b"still writable")),
        _outcome(lambda: a.recv_bytes()),
    ]


def _maxlength_exceeded_one_way(pipe):
    reader, writer = pipe(duplex=False)
    writer.send_bytes(b"x" * 10)
    return [
        _outcome(lambda: reader.recv_bytes(5)),
        _outcome(lambda: reader.closed),
        _outcome(lambda: reader.recv_bytes()),
    ]


def _maxlength_fits(pipe):
    a, b = pipe()
    a.send_bytes(b"x" * 5)
    a.send_bytes(b"")
    return [_outcome(lambda: b.recv_bytes(5)), _outcome(lambda: b.recv_bytes(0))]


def _buffer_too_short(pipe):
    a, b = pipe()
    a.send_bytes(b"hello")
    a.send_bytes(b"next")

    def too_short():
        try:
            b.recv_bytes_into(bytearray(3))
        except multiprocessing.BufferTooShort as exc:
            return exc.args
        return "not raised"

    return [_outcome(too_short), _outcome(lambda: b.recv_bytes())]


def _poll_without_data(pipe):
    a, b = pipe()
    results = [_outcome(lambda: b.poll()), _outcome(lambda: b.poll(-1)),
               _outcome(lambda: b.poll(0))]
    a.send(1)
    results += [_outcome(lambda: b.poll(10)), _outcome(lambda: b.recv())]
    return results


def _eof(pipe):
    a, b = pipe()
    a.send("last")
    a.close()
    return [_outcome(lambda: b.recv()),
            _outcome(lambda: b.recv(), compare_message=False),
            _outcome(lambda: b.recv_bytes(), compare_message=False)]


def _unpicklable(pipe):
    a, b = pipe()
    def local():
        return None
    return [_outcome(lambda: a.send(local), compare_message=False),
            _outcome(lambda: a.send("fine")), _outcome(lambda: b.recv())]


def _not_a_buffer(pipe):
    a, _b = pipe()
    return [_outcome(lambda: a.send_bytes("text"), compare_message=False),
            _outcome(lambda: a.send_bytes(12), compare_message=False)]


SCENARIOS = [
    pytest.param(_send_bytes_bad_offsets, id="send_bytes-bad-offsets"),
    pytest.param(_send_bytes_offsets_are_in_bytes, id="send_bytes-offsets-in-bytes"),
    pytest.param(_recv_bytes_into_bad_offsets, id="recv_bytes_into-bad-offsets"),
    pytest.param(_recv_bytes_into_offsets, id="recv_bytes_into-offsets"),
    pytest.param(_negative_maxlength, id="negative-maxlength"),
    pytest.param(_closed_handle, id="closed-handle"),
    pytest.param(_closed_handle_negative_maxlength, id="closed-handle-negative-maxlength"),
    pytest.param(_wrong_direction, id="wrong-direction"),
    pytest.param(_wrong_direction_negative_maxlength, id="wrong-direction-negative-maxlength"),
    pytest.param(_maxlength_exceeded_duplex, id="maxlength-exceeded-duplex"),
    pytest.param(_maxlength_exceeded_one_way, id="maxlength-exceeded-one-way"),
    pytest.param(_maxlength_fits, id="maxlength-fits"),
    pytest.param(_buffer_too_short, id="buffer-too-short"),
    pytest.param(_poll_without_data, id="poll"),
    pytest.param(_eof, id="eof"),
    pytest.param(_unpicklable, id="unpicklable"),
    pytest.param(_not_a_buffer, id="not-a-buffer"),
]


@contextlib.contextmanager
def _closing_all(pipe):
    """`pipe`, made to remember the ends it creates, which are closed on exit."""
    made = []

    def tracked(*args, **kwargs):
        ends = pipe(*args, **kwargs)
        made.extend(ends)
        return ends

    try:
        yield tracked
    finally:
        for end in made:
            end.close()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_behaviour_as_multiprocessing_pipe(scenario):
    with _closing_all(multiprocessing.Pipe) as pipe:
        expected = scenario(pipe)
    with _closing_all(loopfast.Pipe) as pipe:
        assert scenario(pipe) == expected


def test_connection_is_the_name_multiprocessing_users_import():
    # multiprocessing.connection.Connection is what Pipe() returns there; here it is Channel.
    from loopfast import Connection
    from loopfast.connection import Connection as connection_module_name
    assert Connection is connection_module_name is loopfast.Channel
    a, b = loopfast.Pipe()
    with a, b:
        assert isinstance(a, Connection)
