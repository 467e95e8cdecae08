"""horizons.py: the 95% interval, the ratios and the table, on hand-made ablate.py results."""

import json

import pytest

import horizons


def run(val, tokens):
    return {"val": val, "tokens": tokens}


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
    # (100 tokens, 3 s, 7.0) to (200 tokens, 6 s, 6.0): 150 tokens (0.75×) and 4.5 s (1.125×)
    short = study(tmp_path / "short", 200, {
        "baseline": [run([[0, 0, 0, 10], [1, 100, 2, 8], [2, 200, 4, 6]], 200),
                     run([[0, 0, 0, 10], [1, 100, 2, 8], [2, 200, 4, 7]], 200)],
        "fast": [run([[0, 0, 0, 10], [1, 100, 3, 7], [2, 200, 6, f]], 200) for f in (5, 6, 7)],
    })
    # 400 tokens, one seed each: "fast" reaches 5.0 at its first evaluation after 0 tokens (0×); "slow" never
    long = study(tmp_path / "long", 400, {
        "baseline": [run([[0, 0, 0, 9], [2, 400, 8, 5]], 400)],
        "slow": [run([[0, 0, 0, 9], [2, 400, 8, 6]], 400)],
        "fast": [run([[0, 0, 0, 5], [2, 400, 16, 4]], 400)],
    })
    table, curves = horizons.report([long, short])  # in any order: sorted by tokens
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()[2:]]
    assert rows == [
        ["baseline", "200", "2", "6.500 ± 6.353", "+0.000", "1.00×", "1.00×"],
        ["baseline", "400", "1", "5.000", "+0.000", "1.00×", "1.00×"],
        ["fast", "200", "3", "6.000 ± 2.484", "-0.500", "0.75×", "1.12×"],
        ["fast", "400", "1", "4.000", "-1.000", "0.00×", "0.00×"],
        ["slow", "400", "1", "6.000", "+1.000", "not reached", "not reached"],
    ]
    assert curves["fast"] == [(200, pytest.approx(0.75), pytest.approx(1.125)), (400, 0.0, 0.0)]
    assert curves["slow"] == [(400, None, None)]

    horizons.main([short, long, "--out", str(tmp_path / "out")])
    assert "| fast | 200 | 3 |" in (tmp_path / "out" / "horizons.md").read_text()
    assert (tmp_path / "out" / "horizons.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_results_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not an ablate.py results.json.*run ablate.py --out"):
        horizons.main([str(tmp_path)])
