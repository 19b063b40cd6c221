"""bench/text_layout_probe.py run for real on the built-in model's text encoder."""

import json

from conftest import run_bench

CHANCE = 1 / 12  # eleven colours and "nothing"


def test_the_probe_reads_the_first_clauses_cell_from_the_built_in_encoder_far_above_chance():
    done = run_bench("text_layout_probe.py", "--train", "3000", "--steps", "500", "--n", "100", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["clause_colour_accuracy"]) == len(result["clause_kind_accuracy"]) == 3  # held-out scenes hold 1-3 shapes
    assert all(0 <= v <= 1 for v in result["clause_colour_accuracy"] + result["clause_kind_accuracy"])
    assert result["clause_colour_accuracy"][0] > 4 * CHANCE  # a probe that read the wrong cells would sit at chance
    assert result["empty_cells_read_empty"] > 0.9


def test_a_probe_without_training_steps_is_refused():
    done = run_bench("text_layout_probe.py", "--steps", "0")
    assert done.returncode == 2 and "must be positive" in done.stderr
