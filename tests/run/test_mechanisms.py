"""The dictionary mechanisms' facts live in one table (harness.run.mechanisms): validation, identity,
the model, the diagnostics and the plans read them there, and nothing else names a mechanism."""
import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from harness.run import identity, mechanisms
from harness.run.config import MocoConfig, make_config
from harness.run.errors import ConfigError
from harness.run.mechanisms import MECHANISMS, Mechanism
from harness.run.validation import validate

PACKAGE = Path(__file__).resolve().parents[2] / "harness"
# What must name them: the table and the config's type; and two other meanings of a word: "shared" as the
# trial record's executor (runs shared between studies) and as a module's old name (planning/shared.py).
MAY_NAME = {"run/mechanisms.py", "run/config.py", "run/trial_record.py", "execution/job_files.py"}


def test_the_configs_type_lists_exactly_the_tables_mechanisms():
    hints = typing.get_type_hints(MocoConfig)
    assert set(typing.get_args(hints["key_encoder"])) == set(MECHANISMS)


def test_no_module_but_the_table_names_a_mechanism():
    """A string literal "memory_bank", "end_to_end", ... outside the table (docstrings aside) is a fact
    written twice (defaults too: mechanisms.DEFAULT)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in MAY_NAME:
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{rel}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and node.value in MECHANISMS and id(node) not in docstrings]
    assert found == []


@pytest.fixture
def a_new_mechanism(monkeypatch):
    """A mechanism added to the table alone: MoCo's facts under another name, ignoring one more setting."""
    row = dataclasses.replace(MECHANISMS["momentum"], name="momentum_twin",
                              ignores=("moco.bank_momentum", "moco.temperature"))
    monkeypatch.setitem(MECHANISMS, "momentum_twin", row)
    return row


def test_adding_a_row_is_all_validation_and_identity_need(a_new_mechanism):
    cfg = make_config("fmnist-tiny", [])
    cfg.moco.key_encoder = "momentum_twin"  # past the config's type, as a new row would be once typed
    validate(cfg)  # a queue mechanism: K must be a multiple of the batch, as for momentum
    cfg.moco.queue_size = 1000
    with pytest.raises(ConfigError, match="moco.queue_size: K=1000 is not a multiple"):
        validate(cfg)
    a, b = make_config("fmnist-tiny", []).to_dict(), make_config("fmnist-tiny", []).to_dict()
    for d, tau in ((a, 0.1), (b, 0.2)):
        d["moco"].update(key_encoder="momentum_twin", temperature=tau)
    assert identity.identity_digest(a) == identity.identity_digest(b)  # the row's ignored setting


def test_an_unknown_mechanism_is_one_line_naming_the_field():
    with pytest.raises(ConfigError, match=r"moco.key_encoder: 'bank' is not a dictionary mechanism; choose one of "):
        mechanisms.mechanism("bank")


@pytest.mark.parametrize("name", list(MECHANISMS))
def test_each_row_is_consistent(name):
    m: Mechanism = MECHANISMS[name]
    assert m.name == name and m.summary
    assert m.has_queue == (m.negatives == "queue") and not (m.k_is_batch and m.has_queue)
    assert ("moco.momentum" in m.ignores) != m.momentum_encoder  # only a key encoder of its own reads m


def test_old_module_names_are_not_served():
    """The flat package's names are read only where old job files are unpickled (execution/job_files.py)."""
    done = subprocess.run([sys.executable, "-c", "import harness.config"], capture_output=True, text=True)
    assert done.returncode == 1 and "No module named 'harness.config'" in done.stderr
