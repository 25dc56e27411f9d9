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
