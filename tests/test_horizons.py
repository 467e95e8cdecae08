"""horizons.py: the 95% intervals, the ratios and the table, on hand-made ablate.py results."""

import json

import pytest

import horizons


def run(val, tokens, seed=1, data="data/proxy"):
    return {"val": val, "tokens": tokens, "config": {"train": {"seed": seed, "data_dir": data}}}


def study(path, tokens, variants):
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"tokens": tokens, "variants": variants}))
    return str(path)


@pytest.mark.parametrize("df,t", [(1, 12.706), (2, 4.303), (9, 2.262), (10, 2.228), (20, 2.086), (30, 2.042),
                                  (60, 2.000), (120, 1.980)])
def test_t975_matches_the_printed_table(df, t):
    assert horizons.t975(df) == pytest.approx(t, abs=1e-3)


def test_interval():
    assert horizons.interval([5.0, 6.0, 7.0]) == pytest.approx((6.0, 4.303 / 3**0.5))  # stdev 1, 3 seeds
    assert horizons.interval([6.0, 7.0]) == pytest.approx((6.5, 12.706 * 0.5))  # stdev √0.5, 2 seeds
    assert horizons.interval([6.0]) == (6.0, None)


def test_report_and_files(tmp_path):
    # 200 tokens: the baseline ends at 6.5 (mean of 6 and 7) after 4 s; "fast" crosses 6.5 halfway from
    # (100 tokens, 3 s, 7.0) to (200 tokens, 6 s, 6.0): 150 tokens (0.75×) and 4.5 s (1.125×). Its seeds 1
    # and 2 end 1.0 and 0.0 below the baseline's (a seed 3 has no pair): -0.5 ± 12.706·√0.5/√2
    short = study(tmp_path / "short", 200, {
        "baseline": [run([[0, 0, 0, 10], [1, 100, 2, 8], [2, 200, 4, 6 + s]], 200, seed=1 + s) for s in (0, 1)],
        "fast": [run([[0, 0, 0, 10], [1, 100, 3, 7], [2, 200, 6, f]], 200, seed=s)
                 for s, f in ((1, 5), (2, 7), (3, 6))],
    })
    # 400 tokens, one seed each: "fast" is below 5.0 at its first evaluation (0×); "slow" never gets there
    long = study(tmp_path / "long", 400, {
        "baseline": [run([[0, 0, 0, 9], [2, 400, 8, 5]], 400)],
        "slow": [run([[0, 0, 0, 9], [2, 400, 8, 6]], 400)],
        "fast": [run([[0, 0, 0, 5], [2, 400, 16, 4]], 400)],
    })
    table, curves = horizons.report([long, short])  # in any order: sorted by tokens
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert rows == [
        ["baseline", "200", "2", "6.500 ± 6.353", "+0.000 ± 0.000", "1.00×", "1.00×"],
        ["baseline", "400", "1", "5.000", "+0.000", "1.00×", "1.00×"],
        ["fast", "200", "3", "6.000 ± 2.484", "-0.500 ± 6.353", "0.75×", "1.12×"],
        ["fast", "400", "1", "4.000", "-1.000", "0.00×", "0.00×"],
        ["slow", "400", "1", "6.000", "+1.000", "not reached", "not reached"],
    ]
    assert curves["fast"] == [(200, pytest.approx(0.75), pytest.approx(1.125)), (400, 0.0, 0.0)]
    assert curves["slow"] == [(400, None, None)]

    horizons.main([short, long, "--out", str(tmp_path / "out")])
    assert "| fast | 200 | 3 |" in (tmp_path / "out" / "horizons.md").read_text()
    assert (tmp_path / "out" / "horizons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_are_of_the_baselines_budget(tmp_path):
    # the baseline dips to 6.0 at 100 tokens and ends at 6.05 after 300 (6 s): a variant reaching 6.05 at
    # 300 tokens took the baseline's budget (1.00×), not 3× the baseline's first crossing; the baseline
    # itself shows that it had its final loss at 100 tokens (0.33×), after 2 s of its 6 (0.33×)
    dip = study(tmp_path / "dip", 300, {
        "baseline": [run([[0, 0, 0, 10], [1, 100, 2, 6.0], [2, 200, 4, 6.1], [3, 300, 6, 6.05]], 300)],
        "same": [run([[0, 0, 0, 10], [1, 100, 2, 6.2], [2, 200, 4, 6.1], [3, 300, 6, 6.05]], 300)],
    })
    table, _ = horizons.report([dip])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert [r[-2:] for r in rows] == [["0.33×", "0.33×"], ["1.00×", "1.00×"]]


def test_studies_that_cannot_be_compared_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="not an ablate.py results.json.*run ablate.py --out"):
        horizons.main([str(tmp_path)])
    a = study(tmp_path / "a", 100, {"baseline": [run([[0, 0, 0, 9], [1, 100, 1, 8]], 100)]})
    b = study(tmp_path / "b", 200, {"baseline": [run([[0, 0, 0, 9], [1, 200, 1, 8]], 200, data="data/other")]})
    with pytest.raises(SystemExit, match="different data"):
        horizons.main([a, b, "--out", str(tmp_path / "out")])
    uneven = study(tmp_path / "uneven", 200, {  # a seed cut short: its mean curve would mislead
        "baseline": [run([[0, 0, 0, 9], [1, 100, 1, 8], [2, 200, 2, 7]], 200),
                     run([[0, 0, 0, 9], [1, 100, 1, 8]], 100, seed=2)]})
    with pytest.raises(SystemExit, match="different steps"):
        horizons.main([uneven])
    nan = study(tmp_path / "nan", 100, {"baseline": [run([[0, 0, 0, 9], [1, 100, 1, float("nan")]], 100)]})
    with pytest.raises(SystemExit, match="NaN"):
        horizons.main([nan])
