"""bench.py --quick as a smoke test: it runs end to end on small synthetic data, and what it measures is sane."""

import json

import bench


def test_quick_bench_runs_and_its_checks_hold(tmp_path):
    out = tmp_path / "bench.json"
    results = bench.main(["--quick", "--threads", "1", "--sections", "fields,memory,fidelity", "--json", str(out)])
    assert json.loads(out.read_text())["machine"]["cores"] >= 1
    exact = next(r for r in results["fields"] if r["field"] == "exact")
    assert exact["err_vs_float64"] < 1e-5  # Algorithm 2 parity, as the bench prints it
    assert all(r["ms"] > 0 and r["x_floor"] > 0 for r in results["fields"])
    # the chunked exact field equals the whole one, and its peak memory was measured
    assert results["memory_summary"]["chunk_vs_whole_err"] < 1e-5
    assert all(r["peak_beyond_inputs_mib"] >= 0 for r in results["memory"])
    # more landmarks, a closer projected field, for each landmark strategy
    for strategy in ("random", "kmeans"):
        rows = sorted((r for r in results["fidelity"] if r["strategy"] == strategy), key=lambda r: r["M"])
        assert rows[-1]["cos"] > rows[0]["cos"] and rows[-1]["rel_l2"] < rows[0]["rel_l2"]


def test_quick_step_breakdown_adds_up(tmp_path):
    rows = bench.main(["--quick", "--threads", "1", "--sections", "step"])["step"]
    assert sorted((r["field"], r["dtype"]) for r in rows) == [(f, d) for f in ("exact", "nystrom") for d in ("bf16", "fp32")]
    for r in rows:
        parts = sum(r[f"{k}_ms"] for k in ("generator", "encoder", "field", "backward", "optimizer", "other"))
        assert abs(parts - r["step_ms"]) < 1e-6 * r["step_ms"] + 1e-9 and 0 < r["field_share"] < 1
