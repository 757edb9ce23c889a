import subprocess
import sys

from timing import hang_s

# In a fresh interpreter: the pytest worker has frozen its own imports already (conftest).
ONCE = """
import gc
from harness.run import process
process.freeze_imports()
frozen = gc.get_freeze_count()
assert frozen > 0
trial_garbage = [[i] for i in range(10_000)]  # what one trial of a worker leaves behind
process.freeze_imports()                       # the next trial's start
assert gc.get_freeze_count() == frozen, (frozen, gc.get_freeze_count())
print("ok")
"""


def test_a_process_freezes_its_imports_once_never_a_trials_garbage_for_the_next():
    """harness.run.process.freeze_imports: the first call freezes what is alive; a worker or an
    evaluation pack calls it again for each trial, and that must not freeze the first trial's objects
    (a model in a reference cycle would then live until the process exits)."""
    proc = subprocess.run([sys.executable, "-c", ONCE], capture_output=True, text=True, timeout=hang_s())
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
