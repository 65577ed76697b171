"""scripts/quickstart_estimate.py: a measured CPU kind is estimated from its own measurement, others by scaling."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from quickstart_estimate import MEASURED, SCALED_FROM, cpu_kind, estimate  # noqa: E402


def test_every_measured_kind_has_a_measurement():
    assert all(m.job_s > 0 and m.cores > 0 for m in MEASURED.values()) and MEASURED[SCALED_FROM].gflops > 0


@pytest.mark.parametrize("flags,kind", [({"avx512f", "amx_bf16", "avx512_bf16"}, "amx_bf16"),
                                        ({"avx512f", "avx512_bf16"}, "avx512_bf16"), ({"avx2"}, None)])
def test_kind_comes_from_the_flags(flags, kind):
    assert cpu_kind(flags) == kind


def test_measured_kind_uses_its_own_time_scaled_by_cores():
    amx = MEASURED["amx_bf16"]
    assert estimate({"amx_bf16"}, amx.cores, gflops=1.0)[0] == pytest.approx(amx.job_s)
    assert estimate({"amx_bf16"}, 2 * amx.cores, gflops=1.0)[0] == pytest.approx(amx.job_s / 2)


def test_unmeasured_kind_scales_by_matrix_speed():
    ref = MEASURED[SCALED_FROM]
    seconds, basis = estimate({"avx2"}, ref.cores, gflops=ref.gflops / 10)
    assert seconds == pytest.approx(10 * ref.job_s) and "scaled" in basis
