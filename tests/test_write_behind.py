"""Writing to the store on a background thread: in order, bounded, errors reach the caller, nothing left unwritten."""

from __future__ import annotations

import threading

import pytest

from softpatch.runtime.write_behind import WriteBehind


class _GatedWriter:
    """A write function that records what it wrote and on which thread; the first write waits for ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.written: list[tuple[int, str]] = []

    def __call__(self, value: int) -> None:
        if not self.written and value == 0:
            assert self.gate.wait(timeout=30)
        self.written.append((value, threading.current_thread().name))


def test_the_caller_goes_on_while_a_write_runs_and_waits_when_one_is_already_pending() -> None:
    writer = _GatedWriter()
    with WriteBehind(writer, pending=1) as write:
        write(0)  # returns although the write waits for the gate: it runs on the background thread
        assert writer.written == []
        second = threading.Thread(target=write, args=(1,))
        second.start()
        second.join(timeout=0.5)
        assert second.is_alive(), "a second write waits while one is pending"
        writer.gate.set()
        second.join(timeout=30)
        assert not second.is_alive()
        for value in range(2, 6):
            write(value)
    # Leaving the block waited for every write: all are there, in order, none on the caller's thread.
    assert [value for value, _ in writer.written] == list(range(6))
    assert all(name.startswith("softpatch-write-behind") for _, name in writer.written)


def test_a_failed_write_reaches_the_caller_at_the_next_call_or_at_close() -> None:
    def failing(value: int) -> None:
        if value == 1:
            raise OSError("no space left on device")

    write = WriteBehind(failing, pending=1)
    write(0)
    write(1)
    with pytest.raises(OSError, match="no space left"):
        write(2)  # waits for write 1, which failed
    write.close()

    at_close = WriteBehind(failing, pending=1)
    at_close(1)
    with pytest.raises(OSError, match="no space left"):
        at_close.close()


def test_an_error_in_the_caller_still_lets_the_queued_writes_finish() -> None:
    writer = _GatedWriter()
    writer.gate.set()
    with pytest.raises(RuntimeError, match="the backbone failed"), WriteBehind(writer, pending=1) as write:
        write(0)
        write(1)
        raise RuntimeError("the backbone failed")
    assert [value for value, _ in writer.written] == [0, 1]


def test_pending_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WriteBehind(print, pending=0)
