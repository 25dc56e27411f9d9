"""The timing cache: one measurement per (target, PyTorch, threads, key), kept across processes in a JSON file."""
import json

import torch

from fxforge.compiler.cache import cache_dir, cached_timing, timings_path
from fxforge.compiler.target import get_target


def test_a_key_is_measured_once_per_target(monkeypatch, tmp_path):
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    calls = []
    measure = lambda: calls.append(1) or {"original_ms": 2.0, "split_ms": 1.0}
    x86, arm = get_target("x86"), get_target("arm64")
    assert cached_timing(x86, "conv 8x8", measure) == {"original_ms": 2.0, "split_ms": 1.0}
    assert cached_timing(x86, "conv 8x8", measure) == {"original_ms": 2.0, "split_ms": 1.0}
    assert len(calls) == 1
    cached_timing(x86, "conv 16x16", measure)
    cached_timing(arm, "conv 8x8", measure)
    assert len(calls) == 3 and timings_path(x86) != timings_path(arm)
    stored = json.loads(timings_path(x86).read_text())
    assert len(stored) == 2 and all(f"threads {torch.get_num_threads()}" in k for k in stored)
    assert timings_path(x86).parent == cache_dir() / "timings" and cache_dir() == tmp_path


def test_a_file_cut_short_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("FXFORGE_CACHE", str(tmp_path))
    path = timings_path(get_target("x86"))
    path.parent.mkdir(parents=True)
    path.write_text('{"torch')
    calls = []
    cached_timing(get_target("x86"), "k", lambda: calls.append(1) or {"t": 1.0})
    assert calls == [1] and json.loads(path.read_text())
