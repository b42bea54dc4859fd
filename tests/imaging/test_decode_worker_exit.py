"""A decode worker whose edge goes away exits quietly (service/imaging/decode_pool.py).

Found on a clean stop of `make serve` after compressed films: the edge exited with a worker's "ready" unread
in its end of the pipe, so the worker's `recv` got ECONNRESET (not EOF) and printed a traceback into the
server log on every stop. The worker must return, exit code 0, nothing on stderr.
"""

from __future__ import annotations

import pytest

from service.imaging.decode_pool import worker_main
from service.imaging.decoding import decode_here
from service.processes import safe_context


@pytest.mark.parametrize("read_ready", [False, True], ids=["ready-unread-reset", "ready-read-end-of-file"])
def test_a_worker_whose_edge_closes_its_pipe_exits_cleanly(capfd, read_ready):
    context = safe_context()
    ours, theirs = context.Pipe()
    process = context.Process(target=worker_main, args=(theirs, decode_here, 512), daemon=True)
    process.start()
    theirs.close()
    assert ours.poll(60), "the worker never said ready"
    if read_ready:
        assert ours.recv() == ("ready",)
    ours.close()  # unread data makes the worker's next recv a reset, not an end of file
    process.join(30)
    errors = capfd.readouterr().err
    assert process.exitcode == 0, errors[-2000:]
    assert "Traceback" not in errors
