"""bench/layout_diversity.py run for real on the built-in model: its counts agree with the cells it reports."""

import json

from conftest import run_bench
from scedit_ui.shapes.world import POSITIONS


def test_layout_diversity_counts_the_distinct_cells_of_each_prompts_seeds():
    done = run_bench("layout_diversity.py", "--n", "2", "--seeds", "2", "--steps", "4", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    rows = result["rows"]
    assert [len(row["cells"]) for row in rows] == [2, 2]
    assert all(cell is None or cell in POSITIONS for row in rows for cell in row["cells"])
    distinct = [len(set(row["cells"])) for row in rows]
    assert result["mean_distinct_cells"] == sum(distinct) / 2
    assert result["all_in_one_cell"] == sum(d == 1 for d in distinct) / 2


def test_one_seed_is_refused_before_any_model_work():
    done = run_bench("layout_diversity.py", "--seeds", "1")
    assert done.returncode == 2 and "--seeds at least 2" in done.stderr
