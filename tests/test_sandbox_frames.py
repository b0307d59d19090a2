"""The pipe protocol between the sandbox server and its worker moves large replies in linear time.

A calibration reply holds every site's Gram (ResNet50 at 64 x 64: a few hundred MB). Reading it by
appending pipe-sized chunks to a bytes object copied it once per chunk: a 96-example calibration
pass that takes 22 s in process did not finish in 400 s in the sandbox. Checked without timing:
the reader's peak allocation is the frame itself (appending needs two copies at once).
"""

from __future__ import annotations

import os
import threading
import tracemalloc

from graphrewrite.rewriting import sandbox


def _round_trip(payload: bytes, deadline: float | None) -> tuple[bytes | bytearray | None, int]:
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (sandbox._write_frame(write_end, payload), os.close(write_end)))
    writer.start()
    tracemalloc.start()
    try:
        frame, timed_out = sandbox._read_frame(read_end, deadline)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        writer.join()
        os.close(read_end)
    assert not timed_out
    return frame, peak


def test_a_large_frame_arrives_whole_in_one_buffer():
    import time

    payload = os.urandom(1 << 16) * 512  # 32 MiB, 512 pipe-sized chunks
    for deadline in (None, time.monotonic() + 600):
        frame, peak = _round_trip(payload, deadline)
        assert frame == payload
        assert peak < 1.1 * len(payload), f"reading a {len(payload)} B frame peaked at {peak} B"


def test_end_of_file_and_empty_frames():
    read_end, write_end = os.pipe()
    sandbox._write_frame(write_end, b"")
    os.close(write_end)
    assert sandbox._read_frame(read_end) == (bytearray(), False)
    assert sandbox._read_frame(read_end) == (None, False)
    os.close(read_end)
