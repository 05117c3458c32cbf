"""The released-code parity benchmark without the released checkouts (CI has none): its table, the errors that name a
path that is not a checkout, the tools it runs the released code with; and, skipped unless ``LFT_BNN_REPO`` /
``LFT_DIFF_TUNING_REPO`` point at checkouts, the parity runs themselves."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import released_parity as rp


def fake_checkout(root: Path, which: str) -> Path:
    for name in rp.CHECKOUTS[which][1]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


# ------------------------------------------------------------------------------------------------------ table
def test_report_has_one_row_per_comparison_and_what_produced_it(tmp_path):
    rows = [
        rp.compare("a loss", 1.5, 1.5),
        rp.compare("a | piped name", 2.0, 2.0 + 1e-7, tol=1e-6, reason="float32"),
        rp.text_row("a split", "6 + 26", "6 + 26"),
    ]
    meta = {"command": "python -m benchmarks.released_parity --bnn PATH", "versions": {"torch": "9.9"},
            "checkouts": {"owner/repo": "abc123"}, "seconds": 12.3, "notes": ["A note."]}  # fmt: skip
    out = rp.write_report(rows, tmp_path / "sub" / "parity.md", meta)
    text = out.read_text()
    lines = text.splitlines()
    assert lines[2] == "| what | released | lightning-ft | abs diff | verdict |"
    table = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert len(table) == 3
    assert "a \\| piped name" in table[1]  # a pipe in a cell does not split it
    assert "`python -m benchmarks.released_parity --bnn PATH`" in text
    assert "`owner/repo@abc123`" in text and "torch 9.9" in text and "Ran in 12 s." in text
    assert text.rstrip().endswith("A note.")


def test_verdicts():
    assert rp.compare("x", 1.0, 1.0).verdict == "equal (bitwise)"
    within = rp.compare("x", 1.0, 1.0 + 1e-7, tol=1e-6, reason="rounding")
    assert within.verdict.startswith("equal (abs diff <= 1.0e-06: rounding")
    assert rp.compare("x", 1.0, 2.0, known="ours keeps X").verdict == "differs: ours keeps X"
    bad = rp.compare("x", 1.0, 2.0, tol=1e-6)
    assert bad.verdict.startswith("DIFFERS: unexplained")
    assert rp.unexplained([within, bad]) == [bad]
    assert rp.text_row("s", "a", "b").verdict == "DIFFERS: unexplained"
    assert rp.text_row("s", "a", "a", note="same names").verdict == "equal (same names)"
    row = rp.tensor_row("t", torch.ones(2, 3), torch.ones(2, 3) + 1e-3, tol=1e-2, reason="r")
    assert row.released.startswith("2x3, mean abs 1") and row.diff.startswith("0.001")
    assert row.verdict.startswith("equal (abs diff <= 1.0e-02: r")


def test_docs_carry_the_committed_table():
    """docs/methods.md, "Released-code parity (measured)", holds the committed table as it is (copy it again after
    a new run)."""
    result = (rp.REPO / "benchmarks/results/released_parity.md").read_text().splitlines()
    table = "\n".join(line for line in result if line.startswith("|"))
    assert table.count("\n") > 10
    docs = (rp.REPO / "docs/methods.md").read_text()
    assert "## Released-code parity (measured)" in docs and table in docs
    assert not any(row.startswith("| ") and "DIFFERS" in row for row in result)


# ------------------------------------------------------------------------------------------------- arguments
def test_the_command_needs_a_checkout(capsys):
    with pytest.raises(SystemExit):
        rp.main([])
    assert "--bnn PATH" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["bnn", "diff_tuning"])
def test_a_folder_that_is_not_a_checkout_is_named(tmp_path, capsys, which):
    flag = rp.FLAGS[which]
    folder = tmp_path / "not_a_checkout"
    folder.mkdir()
    (folder / "train.py").write_text("")
    with pytest.raises(SystemExit):
        rp.main([flag, str(folder)])
    err = capsys.readouterr().err
    assert f"{flag} {folder}" in err and rp.CHECKOUTS[which][0] in err and "missing" in err
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit):
        rp.main([flag, str(missing)])
    assert f"{flag} {missing}: no such directory" in capsys.readouterr().err


def test_the_other_repository_passed_by_mistake_is_recognised(tmp_path):
    dt = fake_checkout(tmp_path / "dt", "diff_tuning")
    with pytest.raises(ValueError, match="looks like a checkout of thuml/Diffusion-Tuning.*--diff-tuning"):
        rp.check_checkout(dt, "bnn")
    bnn = fake_checkout(tmp_path / "bnn", "bnn")
    assert rp.check_checkout(bnn, "bnn") == bnn
    with pytest.raises(ValueError, match="--diff-tuning .*looks like a checkout of Nicholas0228"):
        rp.check_checkout(bnn, "diff_tuning")


def test_checkout_commit(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert rp.checkout_commit(plain) == "unknown"
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    for command in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *command], check=True, env=env)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    assert rp.checkout_commit(repo) == head
    (repo / "inner").mkdir()
    assert rp.checkout_commit(repo / "inner") == "unknown"  # inside a repository is not its top


# ----------------------------------------------------------------------------------- running the released code
SCRIPT = '''
import torch

def helper(x):
    return 2 * x

def main(args):
    probs = torch.Tensor([i ** args.scale for i in range(1, 5)])
    probs = probs / probs.sum()
    for epoch in range(3):
        if args.mode == "LWF":
            doubled = helper(probs)
        total = 1
    return 0
'''


def test_released_statements_are_found_and_run(tmp_path):
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    source = rp.ReleasedSource(path)
    main = source.function("main")
    assigns = [n for n in main.body if isinstance(n, rp.ast.Assign) and rp.assigned_name(n) == "probs"]
    scope = source.run(assigns, {"torch": torch, "args": rp.argparse.Namespace(scale=1.0, mode="LWF")})
    assert torch.allclose(scope["probs"], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    block = source.find(rp.ast.If, "doubled = helper(", within=main)  # the innermost statement holding it
    assert source.source(block).startswith('if args.mode == "LWF"')
    source.run(source.find(rp.ast.FunctionDef, "def helper"), scope)
    assert torch.allclose(source.run(block, scope)["doubled"], 2 * scope["probs"])
    assert source.source(source.find(rp.ast.Assign, within=main, exact="total = 1")) == "total = 1"
    with pytest.raises(LookupError, match="train.py: no If statement with 'missing'"):
        source.find(rp.ast.If, "missing", within=main)
    with pytest.raises(LookupError, match=r"train.py: no function other\(\)"):
        source.function("other")


def test_random_tape_replays_each_function_in_order_and_checks_shapes():
    tape, original = rp.RandomTape(), torch.randn
    with tape.recording():
        a = torch.randn(2, 3)
        t = torch.randint(0, 10, (4,))
        b = torch.randn_like(a)
    assert tape.count() == {"randn": 1, "randn_like": 1, "randint": 1}
    with tape.replaying():  # another order across functions: each function's draws come back in its own order
        t2 = torch.randint(0, 10, (4,))
        b2 = torch.randn_like(torch.zeros(2, 3))
        a2 = torch.randn(2, 3)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(t, t2)
    with pytest.raises(RuntimeError, match="asked for shape"), tape.replaying():
        torch.randn(3, 3)
    with pytest.raises(RuntimeError, match="left unused"), tape.replaying():
        torch.randn(2, 3)
    assert torch.randn is original  # the patches are removed
    with pytest.raises(RuntimeError, match="more often"), tape.replaying():
        torch.randn(2, 3)
        torch.randn(2, 3)


def test_released_imports_are_forgotten(tmp_path):
    (tmp_path / "models.py").write_text("VALUE = 'released'\n")
    before = list(sys.path)
    with rp.released_imports(tmp_path):
        import models  # noqa: PLC0415

        assert models.VALUE == "released"
    assert "models" not in sys.modules and sys.path == before


def test_cpu_torch_makes_cuda_tensors_on_the_cpu():
    cpu = rp.CPUTorch()
    assert cpu.tensor(0.0, device="cuda").device.type == "cpu"
    assert cpu.zeros is torch.zeros
    with rp.cuda_calls_on_cpu():
        layer = torch.nn.Linear(1, 1)
        assert layer.cuda() is layer and torch.ones(1).cuda().device.type == "cpu"


# ------------------------------------------------------------------------------------ parity against checkouts
def _checkout(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} does not point at a checkout of the released repository")
    pytest.importorskip("torchvision")
    return Path(value)


def test_bnn_matches_the_released_code(tmp_path):
    path = rp.check_checkout(_checkout("LFT_BNN_REPO"), "bnn")
    rows, _ = rp.bnn_rows(path, tmp_path)
    assert rows and not rp.unexplained(rows), [r.cells() for r in rp.unexplained(rows)]


def test_diff_tuning_matches_the_released_code(tmp_path):
    path = rp.check_checkout(_checkout("LFT_DIFF_TUNING_REPO"), "diff_tuning")
    rows, _ = rp.diff_tuning_rows(path, tmp_path)
    assert rows and not rp.unexplained(rows), [r.cells() for r in rp.unexplained(rows)]
