"""Thread bounds per job (softpatch.runtime.threads): what is set, where, and that it is restored.

Only counts are asserted, never times: benchmarks/concurrent_fits.py measures what the bounds buy.
"""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import pytest
import torch

from softpatch.cli import main
from softpatch.config import ConfigError, SoftPatchConfig, parse_setting
from softpatch.runtime import threads as threads_module
from softpatch.runtime.threads import (
    active_jobs,
    current_limits,
    decode_pool,
    decode_workers,
    job_slot,
    job_threads,
    limit_threads,
)


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the process may use four cores, so that bounds below the default are observable on any machine."""
    monkeypatch.setattr(threads_module, "cpu_count", lambda: 4)


def test_limit_threads_sets_torch_faiss_and_decoding_and_restores_them(four_cores) -> None:
    torch_before, faiss_before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(3)
    faiss.omp_set_num_threads(3)
    try:
        with limit_threads(1) as inside:
            assert inside.torch == torch.get_num_threads() == 1
            assert inside.faiss == faiss.omp_get_max_threads() == 1
            assert inside.decode == decode_workers() == 1
            with limit_threads(2):  # nested: the inner bound, then the outer one again
                assert (torch.get_num_threads(), faiss.omp_get_max_threads(), decode_workers()) == (2, 2, 2)
            assert (torch.get_num_threads(), faiss.omp_get_max_threads(), decode_workers()) == (1, 1, 1)
        assert torch.get_num_threads() == 3
        assert faiss.omp_get_max_threads() == 3
        assert decode_workers() == 4  # no bound: up to four decoders on four cores
    finally:
        torch.set_num_threads(torch_before)
        faiss.omp_set_num_threads(faiss_before)


def test_limits_are_restored_when_the_job_fails() -> None:
    before = current_limits()
    with pytest.raises(RuntimeError), limit_threads(1):
        raise RuntimeError("the job failed")
    assert current_limits() == before


def test_a_bound_in_one_thread_leaves_the_others_alone() -> None:
    """OpenMP counts are per thread: one app session's bound does not change another's."""
    main_before = current_limits()
    seen: dict[str, tuple] = {}
    release = threading.Event()

    def job() -> None:
        with limit_threads(1):
            seen["job"] = (torch.get_num_threads(), faiss.omp_get_max_threads())
            release.wait(10)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        while "job" not in seen and worker.is_alive():
            worker.join(0.01)
        seen["main"] = (torch.get_num_threads(), faiss.omp_get_max_threads())
    finally:
        release.set()
        worker.join()
    assert seen["job"] == (1, 1)
    assert seen["main"] == (main_before.torch, main_before.faiss)


def test_decode_threads_run_torch_and_faiss_on_one_thread_each() -> None:
    """A new thread starts with OpenMP's process default (a thread per core); decode threads are bounded to one."""
    with limit_threads(2):
        workers = decode_workers()
        with decode_pool(workers) as pool:
            counts = set(pool.map(lambda _: (torch.get_num_threads(), faiss.omp_get_max_threads()), range(8)))
    assert workers <= 2
    assert counts == {(1, 1)}


def test_auto_divides_the_cores_among_concurrent_jobs(four_cores) -> None:
    assert job_threads(None) == 4
    assert job_threads(None, concurrent_jobs=2) == 2
    assert job_threads(None, concurrent_jobs=8) == 1, "never below one thread"
    assert job_threads(3, concurrent_jobs=2) == 3, "an explicit count wins"


def test_job_slots_share_the_cores_and_count_themselves_out(four_cores) -> None:
    assert active_jobs() == 0
    with job_slot() as first:
        assert first.torch == 4 and active_jobs() == 1
        with job_slot() as second:  # a second session's fit starts while the first runs
            assert second.torch == 2 and active_jobs() == 2
        with job_slot(1) as explicit:
            assert explicit.torch == 1
    assert active_jobs() == 0


def test_threads_setting_is_declared_and_checked() -> None:
    assert SoftPatchConfig().threads is None  # auto
    assert parse_setting("threads", "auto") is None
    assert parse_setting("threads", "3") == 3
    for bad in (0, -1, 1000, 1.5, "2", True):
        with pytest.raises(ConfigError, match="threads"):
            SoftPatchConfig(threads=bad)
    assert "threads" not in SoftPatchConfig().feature_key(), "threads do not change the features"
    assert SoftPatchConfig(threads=1).feature_key() == SoftPatchConfig().feature_key()


def test_the_cli_runs_its_command_within_the_bound(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path) -> None:
    import softpatch.cli as cli

    seen: list[tuple] = []

    def fake_vet(args) -> int:
        seen.append((torch.get_num_threads(), faiss.omp_get_max_threads(), decode_workers()))
        return 0

    monkeypatch.setattr(cli, "_cmd_vet", fake_vet)
    before = current_limits()
    assert main(["--quiet", "vet", str(tmp_path), "--threads", "1"]) == 0
    assert seen == [(1, 1, 1)]
    assert current_limits() == before, "restored after the command"
    with pytest.raises(SystemExit) as refused:  # a usage error: argparse exits with its one line
        main(["--quiet", "vet", str(tmp_path), "--threads", "0"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "threads" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _fresh(code: str, **env: str) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-1000:]
    return done.stdout.strip().splitlines()[-1]


def test_the_cli_asks_for_passive_waiting_before_torch_loads() -> None:
    code = (
        "import os, sys\nfrom softpatch.cli import main\n"
        "main(['--quiet', 'vet', '/no/such/folder'])\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    assert _fresh(code) == "PASSIVE True", "set, and torch loaded after it"
    assert _fresh(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE True", "a user's own policy is kept"


def test_passive_waiting_is_not_claimed_once_torch_is_loaded() -> None:
    code = (
        "import os, torch\nfrom softpatch.runtime.threads import prefer_passive_waiting\n"
        "print(prefer_passive_waiting(), os.environ.get('OMP_WAIT_POLICY'))"
    )
    assert _fresh(code) == "False None"


def test_the_app_asks_for_passive_waiting_before_torch_loads() -> None:
    """The first import of the app script sets the policy; torch loads later, with it."""
    app = Path(__file__).resolve().parents[1] / "app.py"
    code = (
        "import os, sys, runpy\n"
        "import streamlit.runtime.scriptrunner_utils.exceptions\n"
        "try:\n"
        f"    runpy.run_path({str(app)!r}, run_name='not_main')\n"
        "except Exception:\n"
        "    pass  # no Streamlit runtime here: only the imports matter\n"
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    )
    assert _fresh(code) == "PASSIVE True", "set, and torch loaded after it"
