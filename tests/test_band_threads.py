"""The search's band threads (qconvert.band_threads): every band runs once, on threads of one intra-op thread each,
errors reach the caller after every band is done, the bytes do not depend on the threads, and a thread's buffers
are reused band after band."""

from __future__ import annotations

import threading

import pytest
import torch

from qconvert import band_threads
from qconvert.algorithms import search_asymmetric, search_symmetric
from qconvert.quantizers import quantize_and_pack_asymmetric, quantize_and_pack_symmetric


@pytest.fixture(scope="module")
def pool() -> band_threads._BandPool:
    before = torch.get_num_threads()
    made = band_threads._BandPool(2)
    assert torch.get_num_threads() == before  # the caller's count is put back
    return made


def test_every_band_runs_once_on_single_threaded_band_threads(pool: band_threads._BandPool,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(band_threads, "_band_pool", lambda: pool)
    seen: dict[int, tuple[str, int]] = {}
    lock = threading.Lock()

    def work(start: int) -> None:
        with lock:
            assert start not in seen
            seen[start] = (threading.current_thread().name, torch.get_num_threads())

    band_threads.run_bands(work, range(0, 40, 4), torch.device("cpu"))
    assert sorted(seen) == list(range(0, 40, 4))
    assert all(name.startswith("qconvert-band-") and count == 1 for name, count in seen.values()), seen
    # A GPU's bands (queued on one stream) and a single band run in order on the caller's thread.
    here: list[str] = []
    band_threads.run_bands(lambda start: here.append(threading.current_thread().name), range(1),
                           torch.device("cpu"))
    assert here == [threading.current_thread().name]


def test_a_failing_band_raises_after_every_band_is_done(pool: band_threads._BandPool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(band_threads, "_band_pool", lambda: pool)
    finished = []

    def work(start: int) -> None:
        if start == 0:
            raise ValueError("band 0 failed")
        finished.append(start)

    with pytest.raises(ValueError, match="band 0 failed"):
        band_threads.run_bands(work, range(6), torch.device("cpu"))
    assert sorted(finished) == [1, 2, 3, 4, 5]  # none left running behind the error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_search_writes_the_same_bytes_on_band_threads_and_in_order(
        pool: band_threads._BandPool, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    weight = (torch.randn(3000, 512) * 0.02).to(dtype)  # bands of 1024, 1024 and 952 rows
    results = {}
    for mode, chosen in (("threads", pool), ("in order", None)):
        monkeypatch.setattr(band_threads, "_band_pool", lambda chosen=chosen: chosen)
        results[mode] = (quantize_and_pack_symmetric(weight, 4, 128, search_symmetric),
                         quantize_and_pack_asymmetric(weight, 4, 128, search_asymmetric))
    for threaded, ordered in zip(results["threads"], results["in order"], strict=True):
        for a, b in zip(threaded, ordered, strict=True):
            assert torch.equal(a, b)


def test_a_threads_buffer_is_reused_and_grown() -> None:
    cpu = torch.device("cpu")
    first = band_threads.thread_buffer("test-slot", (4, 8), torch.float32, cpu)
    again = band_threads.thread_buffer("test-slot", (2, 8), torch.float32, cpu)
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 8)
    other_dtype = band_threads.thread_buffer("test-slot", (4, 8), torch.bfloat16, cpu)
    assert other_dtype.data_ptr() != first.data_ptr()
    grown = band_threads.thread_buffer("test-slot", (16, 8), torch.float32, cpu)
    assert grown.numel() == 128
    elsewhere: list[int] = []
    thread = threading.Thread(target=lambda: elsewhere.append(
        band_threads.thread_buffer("test-slot", (16, 8), torch.float32, cpu).data_ptr()))
    thread.start()
    thread.join()
    assert elsewhere and elsewhere[0] != grown.data_ptr()


def test_band_threads_keep_nothing_of_a_finished_run(pool: band_threads._BandPool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A band's closure holds its tensor and outputs: a pool thread that kept its last one would keep them
    resident until its next band (measured: the previous tensor and its packed output, some 30 MB per run)."""
    import time
    import weakref

    monkeypatch.setattr(band_threads, "_band_pool", lambda: pool)
    tensor = torch.zeros(1024)
    alive = weakref.ref(tensor)

    def work(start: int, tensor: torch.Tensor = tensor) -> None:
        tensor[start] = 1.0

    band_threads.run_bands(work, range(8), torch.device("cpu"))
    assert float(tensor.sum()) == 8.0  # the bands did run
    del work, tensor
    deadline = time.monotonic() + 5.0  # a thread lets go just after it reports its band done
    while alive() is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alive() is None
