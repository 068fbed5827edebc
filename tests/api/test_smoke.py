import loopfast


def test_pipe_round_trip():
    a, b = loopfast.Pipe()
    with a, b:
        a.send_bytes(b"hello")
        assert b.recv_bytes() == b"hello"
        b.send({"answer": 42})
        assert a.recv() == {"answer": 42}
