"""benchmarks.history_size: the sweep runs, and the recommendation follows its rule."""

from __future__ import annotations

from benchmarks import history_size


def _case(rows):
    return {"rows": [{"memory": m, "nstep_mean": s, "converged": c} for m, s, c in rows]}


def test_recommendation_is_the_smallest_m_within_the_slack_everywhere():
    a = _case([(4, 30.0, 8), (8, 21.0, 8), (16, 20.0, 8)])
    b = _case([(4, 10.0, 8), (8, 10.0, 7), (16, 10.0, 8)])
    assert history_size.recommend([a], 0.05) == 8
    # m = 8 loses a converged sample on b, m = 4 is too slow on a: only the full history is left.
    assert history_size.recommend([a, b], 0.05) == 16
    assert history_size.recommend([a, b], 0.6) == 4


def test_quick_sweep_runs(tmp_path):
    out = tmp_path / "h.json"
    res = history_size.main(["--quick", "--out", str(out)])
    assert out.exists()
    assert len(res["cases"]) == len(history_size.CASES) + 1  # and the hard image-DEQ solve
    for case in res["cases"]:
        swept = [r["memory"] for r in case["rows"]]
        assert swept[:len(history_size.QUICK_MEMORIES)] == list(history_size.QUICK_MEMORIES)
        assert max(swept) == max(history_size.QUICK_MEMORIES[-1], case["max_iter"]) or \
            case["problem"]["kind"] != "mdeq"
        for r in case["rows"]:
            assert 1 <= r["nstep_mean"] <= r["nstep_max"] <= case["max_iter"]
    # The hard solve needs the whole history: a short ring loses a sample there.
    mdeq = res["cases"][-1]
    assert mdeq["rows"][-1]["converged"] == mdeq["batch"] > mdeq["rows"][0]["converged"]
    assert res["recommended_memory"] == mdeq["max_iter"]
