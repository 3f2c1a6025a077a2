"""The decode benchmark runs end to end at a tiny size and its projection follows its inputs."""

from __future__ import annotations

import pytest

from cbir.bench import decode as bench_decode


@pytest.mark.slow  # three single extractions and two shared passes
def test_bench_decode_small(tmp_path):
    result = bench_decode.run(
        images=6, size=96, repeats=1, batch_size=4, num_workers=0, data_dir=tmp_path / "data", work=tmp_path / "work"
    )
    assert result["singles_seconds"] > 0 and result["shared_seconds"] > 0
    assert result["ratio"] == pytest.approx(result["shared_seconds"] / result["singles_seconds"])
    assert set(result["shared_parts_seconds"]) == set(bench_decode.ENCODER_SETS["cheap"])
    for parts in result["shared_parts_seconds"].values():
        assert set(parts) == {"decode", "preprocess", "forward", "write"} and all(v >= 0 for v in parts.values())
    assert 0 < result["decode_share"] < 1
    assert result["per_image"]["decode_ms"] > 0


def test_projection_bounds():
    parts = {"decode_ms": 15.0, **{f"preprocess_{s}_ms": 5.0 for s in bench_decode.PREPROCESS_SIZES}}
    slow_gpu = bench_decode.projection(parts, cores=16)
    # one decode instead of 14, so the shared pass never takes longer than the single passes
    assert slow_gpu["shared_hours"] <= slow_gpu["singles_hours"]
    assert slow_gpu["shared_cpu_hours"] < slow_gpu["singles_cpu_hours"]
    assert slow_gpu["bound"].startswith("GPU")
    # a GPU 1000x faster leaves the loader cores as the bound
    fast_gpu = bench_decode.projection(parts, cores=16, gpu_speedup=1000)
    assert fast_gpu["bound"].startswith("CPU")
    assert fast_gpu["shared_hours"] == pytest.approx(fast_gpu["shared_cpu_hours"])
    # 1.6M images x (15 ms decode + 10 distinct preprocessings x 5 ms) on 16 cores
    assert fast_gpu["shared_cpu_hours"] == pytest.approx(1.6e6 * (0.015 + 10 * 0.005) / 16 / 3600)
