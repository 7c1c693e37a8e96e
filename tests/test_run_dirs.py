"""Run directories: a save killed at any write leaves the old run or the new one (never a mix),
and loading a run never imports code named in its plan without an opt-in."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import prunekit as pk
from prunekit.cli.main import main
from prunekit.persist import UntrustedCodeError
from prunekit.plan import PruningPlan
from prunekit.zoo import resolve_model

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
"""The input on which loaded models are compared bitwise."""

CLI_PRUNE = ["prune", "--model", "small_cnn", "--input-shape", "1,3,16,16", "--no-latency"]
"""A fast ``prunekit prune`` (small_cnn, no data, no latency); the seed fixes the model, the ratio its shapes."""


def pruned(seed: int, ratio: float) -> tuple[torch.nn.Module, PruningPlan]:
    """small_cnn initialised from ``seed`` and pruned by ``ratio``: models A and B of the kill tests."""
    torch.manual_seed(seed)
    model = resolve_model("small_cnn").eval()
    return pk.prune(model, X[:1], ratio=ratio, return_plan=True)


# The supervisor builds models A and B once, then for n = 1, 2, ... forks a writer that puts
# B over the current directory (A, or nothing) and SIGKILLs itself just before its n-th
# file-system write; after each kill it loads the directory, then resets it with a complete
# save. Forking keeps one torch import for all kill points (single-threaded, so the fork
# inherits no thread pool).
SUPERVISOR = textwrap.dedent('''
    import builtins, io, json, os, shutil, signal, sys, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, TESTS)
    from test_run_dirs import CLI_PRUNE, X, pruned
    import prunekit as pk
    from prunekit.cli.main import main

    mode, directory = sys.argv[1], Path(sys.argv[2])
    cli, existing = mode.startswith("cli"), not mode.endswith("fresh")

    def cli_run(seed, ratio, out):
        torch.manual_seed(seed)
        assert main([*CLI_PRUNE, "--ratio", str(ratio), "--out", str(out)]) == 0

    def write_a():
        if cli:
            cli_run(0, 0.3, directory)
        else:
            pk.save(*pruned(0, 0.3), directory, model_spec="small_cnn")

    def write_b():
        if cli:
            cli_run(1, 0.6, directory)
        else:
            pk.save(*pruned(1, 0.6), directory, model_spec="small_cnn")

    def output(where):
        with torch.no_grad():
            return pk.load(where).eval()(X)

    refs = {}
    for name, seed, ratio in (("A", 0, 0.3), ("B", 1, 0.6)):
        ref = directory.parent / f"ref{name}"
        if cli:
            cli_run(seed, ratio, ref)
        else:
            pk.save(*pruned(seed, ratio), ref, model_spec="small_cnn")
        refs[name] = output(ref)

    def outcome():
        try:
            y = output(directory)
        except FileNotFoundError:
            return "no run"
        except Exception as exc:
            return f"error {type(exc).__name__}: {exc}"
        return next((k for k, v in refs.items() if torch.equal(y, v)), "mix")

    def leftovers():
        return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))

    def kill_at(n):
        """Fork a writer of B that dies at its n-th write; return True if it was killed."""
        pid = os.fork()
        if pid == 0:
            calls = [0]
            def killing(fn):
                def wrapper(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return fn(*args, **kwargs)
                return wrapper
            for name in ("mkdir", "chmod", "replace", "rename", "link", "symlink", "fsync", "unlink", "rmdir"):
                setattr(os, name, killing(getattr(os, name)))
            real_open, counted_open = io.open, killing(io.open)
            def open_(file, mode="r", *args, **kwargs):
                return (counted_open if set(mode) & set("wxa+") else real_open)(file, mode, *args, **kwargs)
            builtins.open = io.open = open_
            try:
                write_b()
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL
            return True
        assert os.WEXITSTATUS(status) == 0, "the writer failed without being killed"
        return False

    if existing:
        directory.mkdir()
        (directory / "notes.txt").write_text("mine")  # not prunekit's: must survive every save
        write_a()
    results = []
    for n in range(1, 200):
        killed = kill_at(n)
        row = {"n": n, "killed": killed, "exists": directory.exists(), "outcome": outcome()}
        if existing:
            write_a()  # a successful save over whatever the kill left
        else:
            write_b()
        row["leftovers"] = leftovers()
        if existing:
            row["notes"] = (directory / "notes.txt").read_text()
        else:
            shutil.rmtree(directory)  # the next writer again finds no directory
        results.append(row)
        if not killed:
            break
    print(json.dumps(results))
''')


def kill_at_each_write(tmp_path: Path, mode: str) -> list[dict]:
    """Run the supervisor in ``mode`` (``api``/``cli``, ``-fresh`` when no run exists yet); its rows."""
    script = tmp_path / "supervisor.py"
    script.write_text(f"TESTS = {str(Path(__file__).parent)!r}\n" + SUPERVISOR)
    proc = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["api", "cli"])
def test_killed_over_an_existing_run_leaves_the_old_or_the_new_one(tmp_path: Path, mode: str) -> None:
    """``pk.save`` of B (or ``prunekit prune --out``) over run A, SIGKILLed before each of its writes."""
    rows = kill_at_each_write(tmp_path, mode)
    assert [r["killed"] for r in rows] == [True] * (len(rows) - 1) + [False]
    assert {r["outcome"] for r in rows[:-1]} == {"A", "B"}, rows  # killed before and after the switch
    assert rows[-1]["outcome"] == "B"
    # A kill between the two renames leaves no DIR: readers then get the old run.
    assert [r["outcome"] for r in rows if not r["exists"]] == ["A"], rows
    assert all(r["leftovers"] == [] and r["notes"] == "mine" for r in rows), rows


@pytest.mark.parametrize("mode", ["api-fresh", "cli-fresh"])
def test_killed_first_save_leaves_no_run_or_the_complete_one(tmp_path: Path, mode: str) -> None:
    """The same where ``--out`` / the directory does not exist yet."""
    rows = kill_at_each_write(tmp_path, mode)
    assert [r["killed"] for r in rows] == [True] * (len(rows) - 1) + [False]
    assert {r["outcome"] for r in rows[:-1]} == {"no run", "B"} and rows[-1]["outcome"] == "B", rows
    assert all(r["leftovers"] == [] for r in rows), rows


@pytest.fixture
def code_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory whose plan names ``payload.py:build`` shipped in it; the build writes a marker."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    run.mkdir()
    (run / "payload.py").write_text(
        "from pathlib import Path\nfrom prunekit.zoo import resolve_model\n\n"
        f"def build(**kw):\n    Path({str(marker)!r}).write_text('ran')\n    return resolve_model('small_cnn', **kw)\n")
    small, plan = pruned(0, 0.3)
    pk.save(small, plan, run, model_spec=f"{run / 'payload.py'}:build")
    return run, marker


def test_load_refuses_code_named_by_the_plan(code_run: tuple[Path, Path]) -> None:
    run, marker = code_run
    spec = f"{run / 'payload.py'}:build"
    with pytest.raises(UntrustedCodeError) as info:
        pk.load(run)
    assert str(info.value) == (f"{run}/plan.json names code to run (model_spec {spec!r}); pass the architecture "
                               "(pk.load(dir, builder)) or trust_code=True / --trust-code to run it")
    assert not marker.exists()
    ref = pruned(0, 0.3)[0]
    torch.testing.assert_close(pk.load(run, lambda: resolve_model("small_cnn")).eval()(X), ref(X), rtol=0, atol=0)
    assert not marker.exists()
    torch.testing.assert_close(pk.load(run, trust_code=True).eval()(X), ref(X), rtol=0, atol=0)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", [["profile", "--no-latency", "--model"], ["eval", "--data", "digits", "--no-latency",
                                                                             "--subset", "20", "--model"]])
def test_cli_refuses_code_named_by_the_plan(code_run: tuple[Path, Path], command: list[str], capsys) -> None:
    run, marker = code_run
    assert main([*command, str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"prunekit {command[0]}: error: {run}/plan.json names code to run (model_spec "
                   f"'{run / 'payload.py'}:build'); pass the architecture (pk.load(dir, builder)) or trust_code=True "
                   "/ --trust-code to run it")
    assert not marker.exists()
    if command[0] == "profile":
        assert main([*command, str(run), "--trust-code"]) == 0
        assert marker.read_text() == "ran"


def test_a_file_spec_given_by_the_user_still_runs(code_run: tuple[Path, Path], capsys) -> None:
    run, marker = code_run
    assert main(["profile", "--no-latency", "--model", f"{run / 'payload.py'}:build"]) == 0
    assert marker.read_text() == "ran"


def test_zoo_specs_are_not_code() -> None:
    from prunekit.zoo.resolve import is_file_spec

    assert [is_file_spec(s) for s in ("resnet20", "torchvision:resnet50", "timm:vit_tiny_patch16_224",
                                      "nets/model.py:build", "C:\\nets\\m.py:build", "m.py")] == \
        [False, False, False, True, True, False]
