"""Mutation testing with mutmut 3 on the modules where a silent bug costs most (``make mutation``).

mutmut 3 copies the sources to mutate into ``mutants/`` and puts that folder first on
``sys.path``; its mutant names come from file paths. Our packages are mapped by
setuptools ``package-dir`` (``gradserve.v1`` is ``protos/gradserve/v1``), so this script
stages the importable layout ``.mutation/src/gradserve/{v1,server,client}`` with a copy of
``tests/``, and runs mutmut there: the file path ``src/gradserve/v1/codec.py`` is then the
module ``gradserve.v1.codec`` the tests import. A root ``conftest.py`` in the stage refuses
to run if ``gradserve`` is imported from anywhere else (the editable install), and skips a
test that starts a subprocess: a child process imports the original, unmutated code, so
such a test is slow and kills nothing.

The results go to ``benchmarks/results/mutation.txt``: one line per surviving mutant with
the reason it is equivalent, from ``benchmarks/mutation_equivalents.txt`` (unexplained
survivors are listed as such), and a last line ``killed K of N (P%)``.

Usage: ``python scripts/mutation.py [--shards wire,server,client] [--max-children 2] [--report-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".mutation"
RESULTS = ROOT / "benchmarks" / "results" / "mutation.txt"
EQUIVALENTS = ROOT / "benchmarks" / "mutation_equivalents.txt"

# import path of each package -> its folder in the repository (pyproject's package-dir)
PACKAGES = {"gradserve/v1": "protos/gradserve/v1", "gradserve/server": "server", "gradserve/client": "client"}

# Module (short name) -> (file in the stage, functions in scope or None for all). Functions out
# of scope get a ``# pragma: no mutate block`` in the staged copy only: the servicer's
# error mapping is in scope, not its request plumbing.
MODULES: dict[str, tuple[str, set[str] | None]] = {
    "codec": ("src/gradserve/v1/codec.py", None),
    "streaming": ("src/gradserve/v1/streaming.py", None),
    "runtime": ("src/gradserve/server/_runtime.py", None),
    "handles": ("src/gradserve/server/_handles.py", None),
    "errors": ("src/gradserve/server/_errors.py", None),
    "servicer": (
        "src/gradserve/server/_servicer.py",
        {"_abort", "_classify", "_CallRecord.fail", "_CallRecord.finish", "_CallRecord.gone_code", "_rpc", "wrapper"},
    ),
    "checks": ("src/gradserve/server/_checks.py", None),
    "contract": ("src/gradserve/server/_contract.py", None),
    "autograd": ("src/gradserve/client/_autograd.py", None),
}

# Said in the results file of modules whose rows need a word.
NOTES = {
    "errors": "errors: no mutants; the module is class attributes only (status code and reason of each error), "
    "which mutmut 3 does not mutate (it mutates function bodies); tests/test_servicer_mapping.py pins each pair it maps",
}

# Shards: each is one mutmut run with its own fast, in-process tests (unit tests of its
# modules, service tests against an in-process server). Tests that start subprocesses are
# skipped by the stage conftest; SLOW tests (over a second each) are deselected.
SHARDS: dict[str, tuple[list[str], list[str]]] = {
    "wire": (
        ["codec", "streaming"],
        ["tests/test_codec_exact.py", "tests/test_codec.py", "tests/test_golden.py", "tests/test_streaming.py"],
    ),
    "server": (
        ["handles", "contract", "checks", "errors", "servicer"],
        [
            "tests/test_checks.py",
            "tests/test_servicer_mapping.py",
            "tests/test_handle_store.py",
            "tests/test_runtime.py",
            "tests/test_registry.py",
            "tests/test_examples.py",
        ],
    ),
    "client": (["autograd"], ["tests/test_autograd_bridge.py", "tests/test_gradients.py", "tests/test_service.py"]),
    "runtime": (
        ["runtime"],
        [
            "tests/test_runtime_exact.py",
            "tests/test_runtime.py",
            "tests/test_servicer_mapping.py",
            "tests/test_examples.py",
            "tests/test_service.py",
            "tests/test_bad_input.py",
            "tests/test_gradients.py",
        ],
    ),
}
SLOW = [
    "tests/test_gradients.py::test_random_backwards_of_other_callers_do_not_shift_a_replayed_mask",
    "tests/test_bad_input.py::test_deadline_abandons_the_work_and_keeps_no_handle",
    "tests/test_streaming.py::test_streamed_forward_backward_equals_local",
]

# Lines that are not behaviour: log calls (their wording and arguments).
NOT_BEHAVIOUR = [r"\blog\.(debug|info|warning|error|exception)\("]

# Copied as they are (not mutated) for tests that read files of the repository.
COPIED = ["protos", "server", "client", "scripts", "docs", "examples", "functions", "README.md", "constraints.txt"]

STAGE_CONFTEST = '''\
"""Only under ``scripts/mutation.py``: check the import path, skip subprocess tests, run tests in shard order."""
import subprocess
from pathlib import Path

import pytest

import gradserve.v1.codec

_HERE = Path(__file__).resolve().parent
if _HERE not in Path(gradserve.v1.codec.__file__).resolve().parents:
    raise RuntimeError(f"mutation run imports gradserve from {gradserve.v1.codec.__file__}, not from {_HERE}")

ORDER = @ORDER@


def _no_subprocess(self, *args, **kwargs):
    pytest.skip("mutation run: a subprocess would import the unmutated code")


@pytest.fixture(autouse=True)
def _in_process_only(monkeypatch):
    monkeypatch.setattr(subprocess.Popen, "__init__", _no_subprocess)


def pytest_ignore_collect(collection_path, config):
    """Collect only this shard's test files (the mutmut selection is all of tests/, so that it never changes)."""
    tests = _HERE / "tests"
    if collection_path.is_dir() and tests in collection_path.parents:
        return True  # tests/integration: against a deployed server
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_") and collection_path.parent == tests:
        return collection_path.relative_to(_HERE).as_posix() not in ORDER
    return None


def pytest_collection_modifyitems(items):
    """Focused unit tests first, so that -x stops a killed mutant early."""
    rank = {name: i for i, name in enumerate(ORDER)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(ORDER)))
'''

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout",
          -24: "timeout", 152: "timeout", 255: "timeout", 37: "killed", None: "not checked"}  # fmt: skip


def _scope(path: Path, functions: set[str]) -> None:
    """Mark every function of ``path`` outside ``functions`` (``name`` or ``Class.name``) not to be mutated."""
    import libcst as cst

    class Marker(cst.CSTTransformer):
        def __init__(self) -> None:
            self.classes: list[str] = []

        def visit_ClassDef(self, node: cst.ClassDef) -> bool:
            self.classes.append(node.name.value)
            return True

        def leave_ClassDef(self, original: cst.ClassDef, updated: cst.ClassDef) -> cst.ClassDef:
            self.classes.pop()
            return updated

        def leave_FunctionDef(self, original: cst.FunctionDef, updated: cst.FunctionDef) -> cst.FunctionDef:
            name = ".".join([*self.classes, updated.name.value])
            if name in functions or updated.name.value in functions or not isinstance(updated.body, cst.IndentedBlock):
                return updated
            header = updated.body.header.with_changes(comment=cst.Comment("# pragma: no mutate block"))
            return updated.with_changes(body=updated.body.with_changes(header=header))

    path.write_text(cst.parse_module(path.read_text()).visit(Marker()).code)


def write_conftest(root: Path, shard: str) -> None:
    """The stage conftest: the shard's test files that exist now, in order."""
    tests = [t for t in SHARDS[shard][1] if (ROOT / t).exists()]
    (root / "conftest.py").write_text(STAGE_CONFTEST.replace("@ORDER@", repr(tests)))


def write_config(root: Path, shard: str) -> None:
    """The stage conftest and the mutmut and pytest configuration of a shard."""
    modules = SHARDS[shard][0]
    write_conftest(root, shard)
    toml_list = lambda items: "[" + ", ".join(json.dumps(i) for i in items) + "]"  # noqa: E731
    deselect = [arg for test in SLOW for arg in ("--deselect", test)]
    (root / "pyproject.toml").write_text(
        f"""\
[tool.mutmut]
source_paths = ["src"]
only_mutate = {toml_list(MODULES[m][0] for m in modules)}
do_not_mutate_patterns = {toml_list(NOT_BEHAVIOUR)}
also_copy = {toml_list(["conftest.py", *COPIED])}
pytest_add_cli_args_test_selection = ["tests"]
pytest_add_cli_args = {toml_list(["-p", "no:cacheprovider", "-m", "not slow", "--timeout=120", *deselect])}
process_isolation = "forkserver"
use_git_change_detection = false

[tool.pytest.ini_options]
markers = ["slow: long-running"]
"""
    )


def stage(shard: str) -> Path:
    """Write the importable layout, the tests and the mutmut configuration of one shard."""
    root = STAGE / shard
    modules = SHARDS[shard][0]
    shutil.rmtree(root, ignore_errors=True)
    for target, source in PACKAGES.items():
        shutil.copytree(ROOT / source, root / "src" / target, ignore=shutil.ignore_patterns("__pycache__"))
    for name in modules:
        path, functions = MODULES[name]
        if functions is not None:
            _scope(root / path, functions)
    shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    for name in COPIED:  # unmutated, for tests that read the sources (import rules, stub diffs)
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__", "node_modules"))
        elif source.exists():
            shutil.copy2(source, root / name)
    write_config(root, shard)
    return root


def run_mutmut(root: Path, max_children: int, mutants: list[str] | None = None) -> tuple[float, float]:
    """Run mutmut in one shard's stage: (wall time, CPU time of it and its children), in seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("PYTHONPATH", None)
    mutmut = Path(sys.executable).parent / "mutmut"
    start, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [str(mutmut), "run", "--max-children", str(max_children), *(mutants or [])]
    subprocess.run(command, cwd=root, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - start, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime


def load_results(shard: str) -> dict[str, dict[str, int | None]]:
    """Exit code of every mutant of a shard, by module short name."""
    by_module: dict[str, dict[str, int | None]] = {}
    for name in SHARDS[shard][0]:
        meta = STAGE / shard / "mutants" / (MODULES[name][0] + ".meta")
        by_module[name] = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
    return by_module


def mutant_diffs(shard: str, module: str, mutants: list[str]) -> dict[str, str]:
    """The changed lines of each mutant, ``-old`` then ``+new``, on one line."""
    if not mutants:
        return {}
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    code = (
        "import json, sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
        f"print(json.dumps({{m: get_diff_for_mutant(m, path={MODULES[module][0]!r}) for m in {mutants!r}}}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=STAGE / shard, env=env, capture_output=True, text=True, check=True)
    diffs = {}
    for mutant, diff in json.loads(out.stdout).items():
        changed = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        diffs[mutant] = "  ".join(" ".join(line.split()) for line in changed)
    return diffs


def load_equivalents() -> list[tuple[str, str, str]]:
    """(function, text in the mutant's diff, reason) from EQUIVALENTS: ``function | text | reason`` lines."""
    entries = []
    for line in EQUIVALENTS.read_text().splitlines() if EQUIVALENTS.exists() else []:
        if line.strip() and not line.startswith("#"):
            function, text, reason = (part.strip() for part in line.split(" | ", 2))
            entries.append((function, text, reason))
    return entries


def function_of(mutant: str) -> str:
    """``decode_tensor`` or ``HandleStore.put`` for ``gradserve.v1.codec.x_decode_tensor__mutmut_3``."""
    mangled = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    return mangled[2:] if mangled.startswith("x_") else ".".join(mangled.split("\u01c1")[1:3])


def rerun_count(shard: str) -> int:
    """How many times the shard's survivors were run again (``--rerun-survivors``)."""
    path = STAGE / shard / "reruns"
    return int(path.read_text()) if path.exists() else 0


def report(shards: list[str], times: dict[str, tuple[float, float]], max_children: int) -> str:
    import mutmut

    equivalents = load_equivalents()
    rows, survivors, scope = [], [], []
    total: Counter[str] = Counter()
    for shard in shards:
        for name, codes in load_results(shard).items():
            path, functions = MODULES[name]
            scope.append(path[4:] + (f" ({', '.join(sorted(functions))})" if functions else ""))
            counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
            n = sum(counts.values()) - counts["not checked"]
            killed = counts["killed"] + counts["timeout"]
            rows.append(f"{name:<10} {shard:<7} {path[4:]:<34} {killed:>6} {n - killed:>8} {counts['timeout']:>7} "
                        f"{n:>5} {100 * killed / n if n else 0:>6.1f}% {counts['not checked']:>9}")  # fmt: skip
            total.update(counts)
            done = ("killed", "timeout", "not checked")
            alive = sorted((m for m, c in codes.items() if STATUS.get(c, "suspicious") not in done),
                           key=lambda m: (function_of(m), int(m.rpartition("_")[2])))  # fmt: skip
            diffs = mutant_diffs(shard, name, alive)
            for mutant in alive:
                function, diff = function_of(mutant), diffs[mutant]
                reason = next((r for f, t, r in equivalents if f == function and t in diff), "UNEXPLAINED")
                survivors.append(f"- {mutant} [{STATUS.get(codes[mutant], 'suspicious')}]\n    {diff}\n    reason: {reason}")
    n = sum(total.values()) - total["not checked"]
    killed = total["killed"] + total["timeout"]
    lines = [
        "# Mutation testing (issue 14)",
        f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"mutmut: {mutmut.__version__}",
        f"scope: {'; '.join(scope)}",
        f"not mutated: log calls ({', '.join(NOT_BEHAVIOUR)}): wording of log lines, not behaviour",
        *(f"tests of shard {s}: {', '.join(SHARDS[s][1])}" for s in shards),
        f"deselected as slow: {', '.join(SLOW)}; tests that start a subprocess are skipped",
        f"command: make mutation  (python scripts/mutation.py --max-children {max_children})",
        f"wall time: {sum(w for w, _ in times.values()) / 60:.1f} min on {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end ({', '.join(f'{s} {w / 60:.1f} min' for s, (w, _) in times.items())})",
        f"CPU time: {sum(c for _, c in times.values()) / 60:.1f} min; on {max_children} unshared cores about "
        f"{sum(c for _, c in times.values()) / 60 / max_children:.1f} min of wall time",
        *(
            [f"survivors re-run with tests written after the first pass (--rerun-survivors): {', '.join(reruns)}"]
            if (reruns := [f"{s} {rerun_count(s)}x" for s in shards if rerun_count(s)])
            else []
        ),
        "timeouts count as killed (the mutant made the tests hang); 'no tests' and 'suspicious' count as survived;",
        "'unchecked' mutants (the run was stopped before their turn) are not counted in K or N",
        "",
        f"{'module':<10} {'shard':<7} {'file':<34} {'killed':>6} {'survived':>8} {'timeout':>7} {'total':>5} {'killed%':>7} "
        f"{'unchecked':>9}",
        *rows,
        *(NOTES[name] for shard in shards for name in SHARDS[shard][0] if name in NOTES),
        "",
        f"surviving mutants ({len(survivors)}), each with the reason it is equivalent or left:",
        *survivors,
        "",
        f"killed {killed} of {n} ({100 * killed / n if n else 0:.1f}%)",
    ]
    return "\n".join(lines) + "\n"


def rerun_survivors(shard: str, max_children: int) -> tuple[float, float]:
    """Copy the current tests into a finished shard and run its surviving mutants again (after new tests)."""
    root = STAGE / shard
    for tests in (root / "tests", root / "mutants" / "tests"):
        shutil.copytree(ROOT / "tests", tests, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    write_conftest(root, shard)  # not the pyproject: a changed test selection would void every result
    shutil.copy2(root / "conftest.py", root / "mutants" / "conftest.py")
    alive = [m for codes in load_results(shard).values() for m, c in codes.items() if STATUS.get(c) not in ("killed", "timeout")]
    if not alive:
        return 0.0, 0.0
    return run_mutmut(root, max_children, alive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=",".join(SHARDS), help=f"comma-separated, of {', '.join(SHARDS)}")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report-only", action="store_true", help="rewrite the results file from the last run")
    parser.add_argument("--rerun-survivors", action="store_true", help="run the survivors again with the current tests")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    shards = args.shards.split(",")
    unknown = set(shards) - set(SHARDS)
    if unknown:
        parser.error(f"unknown shards {sorted(unknown)}; expected some of {', '.join(SHARDS)}")
    times: dict[str, tuple[float, float]] = {}
    for shard in shards:
        timing = STAGE / shard / "times_s.json"
        if args.rerun_survivors:
            wall, cpu = json.loads(timing.read_text())
            again = rerun_survivors(shard, args.max_children)
            timing.write_text(json.dumps([wall + again[0], cpu + again[1]]))
            (STAGE / shard / "reruns").write_text(str(rerun_count(shard) + 1))
        elif not args.report_only:
            timing.write_text(json.dumps(run_mutmut(stage(shard), args.max_children)))
        times[shard] = tuple(json.loads(timing.read_text())) if timing.exists() else (0.0, 0.0)
    text = report(shards, times, args.max_children)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text.rstrip().splitlines()[-1])


if __name__ == "__main__":
    main()
