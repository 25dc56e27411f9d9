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


def test_a_tvm_dict_naming_another_cpu_decides_the_features_and_whether_it_runs_here():
    """``get_target("x86").with_tvm(mcpu="skylake-avx512")`` (the documented way to retarget) kept "this machine's
    features": compile ran the AVX-512 library here to check it, and on an AVX2 CPU the process died of an
    illegal instruction. LLVM says what the code uses; a user's Target without ``isa`` gets the same."""
    pytest.importorskip("tvm")
    from fxforge.compiler.target import Target

    avx512 = get_target("x86").with_tvm(mcpu="skylake-avx512")
    assert avx512.features() == {"x86_64", "avx2", "avx512"}
    assert avx512.runs_on_host == (avx512.features() <= host_features())
    assert avx512.lacks() == sorted(avx512.features() - host_features())
    mine = get_target(Target("mine", "a user's", {"kind": "llvm", "mcpu": "cascadelake"}))  # as compile takes it
    assert mine.features() == {"x86_64", "avx2", "avx512", "vnni"} and not mine.saturates_u8s8()
    assert mine.runs_on_host == (mine.features() <= host_features())
    assert get_target("x86-avx512").with_tvm(mcpu="native").features() <= host_features()  # this machine again
    board = get_target("x86").with_tvm(mtriple="aarch64-linux-gnu", mattr=["+neon", "+dotprod"], mcpu="cortex-a76")
    assert board.features() == {"aarch64", "neon", "dotprod"} and not board.runs_on_host
    assert get_target("cuda").with_tvm(arch="sm_90").features() == {"cuda"}  # not a CPU: as declared


@pytest.mark.parametrize("tvm, message", [
    ("llvm", r"target 'mine': tvm must be a dict of TVM target fields such as \{'kind': 'llvm', 'mcpu': "),
    ({"kind": "llvm", "mcpu": "notacpu"}, r"LLVM does not know the CPU mcpu='notacpu' for x86_64"),
])
def test_a_malformed_tvm_dict_is_a_target_error_when_the_target_is_made(tvm, message):
    """A string gave a raw ValueError at save; an unknown CPU built for a generic one, with LLVM's errors printed
    (named when compile or register_target resolves the target)."""
    pytest.importorskip("tvm")
    from fxforge import TargetError
    from fxforge.compiler.target import Target
    if platform.machine() != "x86_64" and isinstance(tvm, dict):
        pytest.skip("the message names this machine's triple")
    with pytest.raises(TargetError, match=message):
        get_target(Target("mine", "a user's", tvm))


def test_a_loaded_target_registered_elsewhere_runs_here_only_where_its_features_are():
    """An artifact for a user's AArch64 board, loaded where the target is not registered, was taken for this
    machine's: a TVM library failed to load with "cannot open shared object file"."""
    from fxforge.compiler.target import loaded_target
    board = {"name": "board-a53", "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "tvm_host": None,
             "ort_providers": ["CPUExecutionProvider"], "torch_device": "cpu", "features": ["aarch64", "neon"]}
    assert not loaded_target(board).runs_on_host or "aarch64" in host_features()
    here = get_target("x86").to_dict()
    assert loaded_target(here).runs_on_host == ("x86_64" in host_features())
    older = {k: v for k, v in get_target("cuda").to_dict().items() if k != "features"}  # no features recorded
    assert loaded_target(older).features() == {"cuda"} and not loaded_target(older).runs_on_host
