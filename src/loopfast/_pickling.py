"""Pickling for ``Channel.send(obj)``, shared by both channel implementations: protocol 5 with
multiprocessing's reducers, large buffers kept out of band (docs/protocol.md, "Objects")."""

import io
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, List, Tuple

from ._wire import OOB_MIN_SIZE

__all__ = ["OutOfBandPickler", "dumps_out_of_band"]


class _BufferCollector:
    """buffer_callback for pickle protocol 5: keeps buffers of OOB_MIN_SIZE bytes and more out of
    band, as flat byte views of the objects' own memory."""

    def __init__(self) -> None:
        self.buffers: List[Any] = []

    def __call__(self, pickle_buffer: pickle.PickleBuffer) -> bool:
        try:
            raw: Any = pickle_buffer.raw()  # a flat byte view of its memory, no copy
        except BufferError:
            # A non-contiguous buffer: one C-order copy, sent out of band as flat bytes.
            # (CPython's pickler refuses a non-contiguous PickleBuffer before calling us.)
            raw = memoryview(pickle_buffer).tobytes()
        if len(raw) < OOB_MIN_SIZE:
            return True  # small: in band
        self.buffers.append(raw)
        return False


class OutOfBandPickler(pickle.Pickler):
    """multiprocessing's ForkingPickler (the same reducers: channels, sockets, ... pickle as they
    do for multiprocessing) at protocol 5 with a buffer_callback, which ForkingPickler's
    constructor does not pass on before Python 3.12."""

    def __init__(self, file: Any, buffer_callback: Any) -> None:
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = ForkingPickler._copyreg_dispatch_table.copy()  # type: ignore[attr-defined]
        self.dispatch_table.update(ForkingPickler._extra_reducers)  # type: ignore[attr-defined]


def dumps_out_of_band(obj: Any) -> Tuple[memoryview, List[Any]]:
    """Pickle `obj` at protocol 5; return (the in-band pickle, the list of out-of-band buffers),
    each a flat byte buffer; the out-of-band ones are views of the objects' own memory."""
    out = io.BytesIO()
    collector = _BufferCollector()
    try:
        OutOfBandPickler(out, collector).dump(obj)
    except BaseException:
        for view in collector.buffers:  # the objects' memory is theirs again at once
            if isinstance(view, memoryview):
                view.release()
        raise
    return out.getbuffer(), collector.buffers
