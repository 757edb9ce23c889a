import subprocess
import sys

import pytest
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


PAUSED = """
import gc
from harness.run import process
process.pause_collection()
assert not gc.isenabled()
garbage = [[i] for i in range(10_000)]
process.freeze_imports()
assert gc.isenabled() and gc.get_freeze_count() > 0
process.pause_collection()         # a process past its start-up (a worker's next trial): nothing paused
assert gc.isenabled()
print("ok")
"""

LEFT_OFF = """
import gc
from harness.run import process
gc.disable()                       # the embedding program's choice
process.pause_collection()
process.freeze_imports()
assert not gc.isenabled()          # not turned on behind its back
print("ok")
"""

# A command imports torch only once it runs, with the collector paused; then it is frozen and resumed.
COMMAND = """
import gc, sys
seen = {}

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and name not in seen:
            seen[name] = gc.isenabled()
        return None

sys.meta_path.insert(0, Watch())
from harness import train
assert "torch" not in sys.modules  # the face's module alone: a usage error costs no torch start-up
assert train.main(["--set", "moco.momentum=2"]) == 2
assert seen == {"torch": False}, seen
assert gc.isenabled() and gc.get_freeze_count() > 0
print("ok")
"""


@pytest.mark.parametrize("script", [PAUSED, LEFT_OFF, COMMAND], ids=["paused-then-resumed", "left-off", "command"])
def test_a_process_imports_with_the_collector_paused_then_resumes_it(script):
    """harness.run.process.start_up (pause_collection, then freeze_imports): the imports a process starts with run without the cyclic
    collector (what it saves: docs/performance.md), freeze_imports resumes it; never in
    a process already running, never against a collector its program turned off."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=hang_s())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
