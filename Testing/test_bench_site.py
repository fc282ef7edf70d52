"""The site bench's table, plot and merging, on results written by hand (the bench itself runs for an hour)."""

from __future__ import annotations

import json

import pytest

from SALTSegmentLib.bench import site
from SALTSegmentLib.bench.site import FRESH_1, FRESH_3, SITE, SITE_WARM, ZERO_SHOT, SiteResults, SiteRun


def _results(runs: list[tuple[str, str, int, float]]) -> SiteResults:
    return SiteResults(["p1", "p2", "p3"], 3, 40,
                       [SiteRun(name, method, previous, [10], {"A": dice, "B": dice}) for name, method, previous,
                        dice in runs], ["A", "B"])


def test_table_states_the_margins_against_each_baseline_and_says_simulated(tmp_path):
    results = _results([("p3", FRESH_1, 0, 0.60), ("p3", SITE, 2, 0.70), ("p3", SITE, 1, 0.66),
                        ("p3", FRESH_3, 0, 0.75), ("p3", ZERO_SHOT, 0, 0.50), ("p3", SITE_WARM, 2, 0.72)])
    table = site.site_table(results)
    assert "(simulated patients)" in table.splitlines()[0]
    assert "| site adapter, 1 slice | 1 | 0.660 | 0.660 |" in table
    assert "site adapter + warm start, 1 slice (0.720)" in table
    assert "same one slice: +0.120" in table and "three slices per structure: -0.030" in table
    paths = site.write_site_outputs(results, tmp_path)
    assert [p.name for p in paths] == ["site.json", "site.md", "site.png"] and paths[2].stat().st_size > 5000


def test_runs_made_apart_merge_into_one_result_each_run_once(tmp_path):
    first = _results([("p3", FRESH_1, 0, 0.60), ("p3", SITE, 2, 0.70)])
    second = _results([("p3", FRESH_3, 0, 0.75), ("p3", FRESH_1, 0, 0.61), ("p2", FRESH_1, 0, 0.55)])
    again = SiteResults.from_dict(json.loads(json.dumps(second.to_dict())))
    merged = site.merge_site_results([first, again])
    assert [(r.left_out, r.method, r.mean_dice) for r in merged.runs] == [
        ("p3", FRESH_1, 0.60), ("p3", SITE, 0.70), ("p3", FRESH_3, 0.75), ("p2", FRESH_1, 0.55)]
    other = SiteResults(["p1", "p2", "p3"], 1, 40, [], ["A", "B"])
    with pytest.raises(ValueError, match="different settings"):
        site.merge_site_results([first, other])
