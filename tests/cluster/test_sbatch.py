"""The Slurm batch script agrees with the Python side on the requeue exit code."""

from __future__ import annotations

from conftest import REPO

from openseek_cpt.errors import EXIT_PREEMPTED


def test_the_sbatch_requeue_code_is_the_python_preemption_code():
    script = (REPO / "slurm" / "train.sbatch").read_text()
    code = [ln for ln in script.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    values = [ln.split("=", 1)[1].split()[0] for ln in code if ln.startswith("EXIT_PREEMPTED=")]
    assert values == [str(EXIT_PREEMPTED)], values
    assert any('"$EXIT_PREEMPTED"' in ln for ln in code), "the script must test the variable, not a literal"
