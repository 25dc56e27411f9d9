"""Targets: this machine's instruction-set features, the named variants, and where u8s8 products saturate."""
import platform
from pathlib import Path

import pytest

from fxforge.compiler.target import available_targets, get_target, host_features


def test_host_features_come_from_cpuinfo():
    features = host_features()
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "x86_64" in features and get_target("x86").features() == features
    if cpuinfo.exists():
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.split(":")[0].strip() in ("flags", "Features")), [])
        assert ("avx2" in flags) == ("avx2" in features)
        assert ("avx512_vnni" in flags or "avx_vnni" in flags) == ("vnni" in features)


@pytest.mark.parametrize("name, saturates", [("x86-avx2", True), ("x86-avx512", True), ("x86-avx512-vnni", False),
                                             ("x86-amx", False), ("arm64", False), ("arm64-dotprod", False),
                                             ("cuda", False)])
def test_named_variants_declare_their_features(name, saturates):
    target = get_target(name)
    assert target.saturates_u8s8() is saturates
    assert target.to_dict()["features"] == sorted(target.features())
    if name.startswith("x86-"):
        assert target.runs_on_host == (target.features() <= host_features())


def test_every_target_has_a_description_and_features():
    assert {"x86", "x86-avx2", "x86-avx512-vnni", "arm64", "arm64-dotprod", "cuda"} <= set(available_targets())
    assert all(t.description and t.features() for t in available_targets().values())


def test_an_artifacts_x86_target_records_its_cpu_and_runs_only_where_its_features_are(monkeypatch):
    """fxforge.json recorded target "x86" as mcpu "native": a TVM library built with AVX-512 on one machine loaded
    on an AVX2 one as runnable, and its first call would die of an illegal instruction. The TVM artifact refuses to
    run where the target lacks a feature; a portable artifact (ONNX, TorchScript) is not refused for it."""
    import fxforge.compiler.target as target_module
    from fxforge.compiler.target import HOST_CPU, get_target, loaded_target
    saved = get_target("x86").to_dict()
    assert saved["tvm"]["mcpu"] != HOST_CPU
    saved["features"] = ["avx2", "avx512", "vnni", "x86_64"]
    monkeypatch.setattr(target_module, "host_features", lambda: frozenset({"x86_64", "avx2"}))
    assert loaded_target(saved).lacks() == ["avx512", "vnni"]
    monkeypatch.setattr(target_module, "host_features", lambda: frozenset({"x86_64", "avx2", "avx512", "vnni"}))
    assert not loaded_target(saved).lacks() and loaded_target(saved).features() == frozenset(saved["features"])
    arm = get_target("arm64").to_dict()
    assert not loaded_target(arm).runs_on_host and not loaded_target(arm).lacks()
