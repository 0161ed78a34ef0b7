"""examples/quickstart.py end to end at one epoch, run twice into the same folder."""
import math
import re
from pathlib import Path

from test_openkbp_example import load_example

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_trains_predicts_scores_and_a_second_run_replaces_the_first(tmp_path, capsys):
    example = load_example(EXAMPLE)
    for _ in range(2):  # the second run into the same folder replaces the first, as its comment says
        example.main(str(tmp_path / "out"), epochs=1)
        printed = capsys.readouterr().out
        found = re.search(r"(phantom_\d+): model MAE ([\d.]+) Gy, mean-dose MAE ([\d.]+) Gy", printed)
        assert found, printed[-2000:]
        assert all(math.isfinite(float(found.group(i))) for i in (2, 3))
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "runs" / "quickstart" / "checkpoints").iterdir())
    assert checkpoints[-1] == "last.ckpt" and len(checkpoints) == 2  # one run's best and last
    assert len(list((tmp_path / "out" / "phantoms").glob("*.npz"))) == 10
