"""The CLI's progress bar: propagation learns its total as it runs, and the bar follows it."""

from SALTSegmentLib.progress import BarReporter
from SALTSegmentLib.propagation import PropagationProgress


def test_the_propagation_bar_takes_its_total_from_the_progress_reports(capsys):
    reporter = BarReporter()
    reporter.start("propagate", 0)                 # as the CLI starts it, before the total is known
    for done in range(1, 5):
        reporter.propagation_step(PropagationProgress(done, 16, elapsed_s=float(done), eta_s=float(16 - done)))
    reporter.close()
    shown = capsys.readouterr().err.rstrip().splitlines()[-1]     # the bar's last line, as the user saw it
    assert "4/16" in shown and " 25%" in shown, shown
