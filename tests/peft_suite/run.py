"""PEFT's own test suite as the judge of `lorakernels.patch_peft`.

    python tests/peft_suite/run.py                       # the CI selection (a few minutes)
    python tests/peft_suite/run.py --selection full      # every selected LoRA test (longer)
    python tests/peft_suite/run.py --peft-tests DIR      # PEFT's tests from a checkout or unpacked sdist

Runs a selection of PEFT's tests (LoRA on plain nn.Linear models: forward, training steps,
merging, saving and loading, adapter switching, ...) unpatched, then with every PeftModel
patched after creation (`lorakernels_peft_plugin.py`), through lorakernels' torch backend and,
on a subset, through the Triton kernels in the Triton interpreter. A test that passes
unpatched must pass patched, unless `EXPECTED_DIFFERENCES` names it with the reason. The
patched runs must make fused calls (a patch that never routes proves nothing).

PEFT's tests are not part of this repository: by default the source distribution of the
installed peft version (which ships tests/) is fetched with `pip download` into a cache
(LORAKERNELS_CACHE, default ~/.cache/lorakernels) and unpacked there.
Exit status: 0 when patched and unpatched agree, 1 otherwise, 2 when a run breaks (e.g. a
collection error), 3 when PEFT's tests cannot be had (no registry, no --peft-tests).
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Plain-LoRA cases of test_custom_models.py on MLPs (vanilla, modules_to_save, dropout 0.1 with
# lora_alpha 4), and three whose LoRA layers fall back (DoRA, lora_b bias) or partly (Conv2d + Linear).
_CI_CASES = (r"Vanilla MLP [1-6] LoRA-|Vanilla MLP 7 LoRA with DoRA-|Vanilla MLP 1 LoRA with lora_b bias-"
             r"|Conv2d 2 LoRA-")
_CUSTOM_FULL = (r"TestPeftCustomModel::.*-LoraConfig-|TestPeftCustomModel::test_\w*(lora|dora)"
                r"|TestMultipleActiveAdapters::.*LoRA|TestRequiresGrad::.*_lora_|TestLayerRepr::test_repr_lora"
                r"|TestMultiRankAdapter::|TestPeftFsdpStateDict::.*-LoraConfig-")


def _select(pairs):
    """One node-id regex from (test file, regex of the rest of the node id after '::')."""
    return "|".join(f"^tests/{f}::({rest})" for f, rest in pairs)


# name: (node-id regex of the selection, node-id regex of its Triton-interpreter subset)
SELECTIONS = {
    "ci": (_select([("test_custom_models.py", rf"TestPeftCustomModel::.*\[({_CI_CASES})")]),
           r"\[Vanilla MLP [46] LoRA-"),
    "full": (_select([
        ("test_custom_models.py", _CUSTOM_FULL),
        # Hot swapping with torch.compile (do_compile=True) is left out: minutes of Inductor per test on a CPU.
        ("test_initialization.py", r"TestLoraInitialization::|TestScaling::|TestLowCpuMemUsage::"
                                   r"|TestHotSwapping::(?!test_hotswap_works\[True)"),
        ("test_low_level_api.py", ""), ("test_lora_variants.py", ""), ("test_other.py", ""),
        ("test_mixed.py", r".*[Ll]o[Rr][Aa]"), ("test_lora_conversion.py", ""), ("test_loraplus.py", ""),
        ("test_lorafa.py", ""), ("test_riemannian_lora.py", ""), ("test_lora_intruders.py", ""),
        ("test_target_parameters.py", r".*LoRA|.*[Ll]ora")]),
        r"\[Vanilla MLP [1-6] LoRA-"),
}


def _files(select):
    return sorted(set(re.findall(r"\^(tests/test_\w+\.py)::", select)))


# Tests whose patched outcome may differ from PEFT's, with the reason (node-id regex: reason).
EXPECTED_DIFFERENCES = {}

MODES = {
    "torch": {"LORAKERNELS_BACKEND": "torch", "TRITON_INTERPRET": None},
    "interpreter": {"LORAKERNELS_BACKEND": "triton", "TRITON_INTERPRET": "1"},
}


def _peft_version():
    import peft

    return peft.__version__


def _download_sdist(version, cache):
    """Unpack peft's sdist for `version` under `cache`; returns the unpacked root."""
    root = cache / f"peft-{version}"
    if (root / "tests").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp]
        subprocess.run(cmd, check=True)
        archive = next(pathlib.Path(tmp).glob("peft-*.tar.gz"))
        with tarfile.open(archive) as tar:
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(cache, **kwargs)
    if not (root / "tests").is_dir():
        raise FileNotFoundError(f"peft {version}'s source distribution has no tests/ (looked in {root})")
    return root


def locate_peft_tests(path=None):
    """The directory holding PEFT's tests/ (given, or fetched for the installed peft version).

    PEFT's tests import each other relatively (`from .testing_common import ...`): a missing
    tests/__init__.py is created.
    """
    if path is not None:
        root = pathlib.Path(path).resolve()
        root = root.parent if root.name == "tests" else root
        if not (root / "tests" / "test_custom_models.py").is_file():
            raise FileNotFoundError(f"--peft-tests: no tests/test_custom_models.py under {root}")
    else:
        cache = pathlib.Path(os.environ.get("LORAKERNELS_CACHE", pathlib.Path.home() / ".cache" / "lorakernels"))
        root = _download_sdist(_peft_version(), cache / "peft-tests")
    (root / "tests" / "__init__.py").touch()
    return root


def _env(patched, mode, select, results, online):
    env = dict(os.environ)
    if not online:  # tests that need the Hugging Face Hub fail at once (alike in every run), not after retries
        env.update(HF_HUB_OFFLINE="1", LORAKERNELS_PEFT_OFFLINE="1")
    for key, value in MODES[mode].items():
        env.pop(key, None) if value is None else env.__setitem__(key, value)
    # The plugin's folder; the repository last (lorakernels, if not installed), after PEFT's `tests` package.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", ""), str(REPO)) if p)
    env.update(LORAKERNELS_PEFT_PATCH="1" if patched else "0", LORAKERNELS_PEFT_SELECT=select,
               LORAKERNELS_PEFT_RESULTS=str(results))
    return env


def start_run(root, files, select, patched, mode, out_dir, online=False):
    """Start one pytest run of PEFT's tests in a subprocess; returns (label, Popen, results path)."""
    label = f"{'patched' if patched else 'unpatched'}-{mode}"
    results = out_dir / f"{label}.json"
    cmd = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(root), "-p", "lorakernels_peft_plugin",
           "-p", "no:cacheprovider", "-q", "-rfE", "-W", "ignore", "--tb=short", *files]
    log = open(out_dir / f"{label}.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=_env(patched, mode, select, results, online), stdout=log,
                            stderr=subprocess.STDOUT)
    return label, proc, results


def counts(results, ids=None):
    """{outcome: number of tests} over `results` (restricted to `ids`)."""
    tally = {"selected": 0, "passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    for nodeid, entry in results.items():
        if ids is None or nodeid in ids:
            tally["selected"] += 1
            tally[entry["outcome"]] += 1
    return tally


def _expected(nodeid):
    return next((why for pattern, why in EXPECTED_DIFFERENCES.items() if re.search(pattern, nodeid)), None)


def compare(unpatched, patched):
    """(unexpected, expected, improved): tests that pass unpatched but not patched (without,
    then with an EXPECTED_DIFFERENCES entry), and tests that pass only patched."""
    unexpected, expected, improved = [], [], []
    for nodeid, entry in sorted(patched.items()):
        before = unpatched.get(nodeid, {}).get("outcome")
        after = entry["outcome"]
        if before == "passed" and after != "passed":
            why = _expected(nodeid)
            (expected if why else unexpected).append((nodeid, after, why or entry.get("error", "")))
        elif before not in (None, "passed") and after == "passed":
            improved.append((nodeid, before))
    return unexpected, expected, improved


def call_totals(results):
    """(fused calls, {fallback reason: calls}, tests with at least one fused call)."""
    fused, fallback, routed = 0, {}, 0
    for entry in results.values():
        calls = entry.get("calls", {})
        fused += calls.get("fused", 0)
        routed += calls.get("fused", 0) > 0
        for reason, n in calls.items():
            if reason != "fused":
                fallback[reason] = fallback.get(reason, 0) + n
    return fused, fallback, routed


def report(selection, runs, peft_root):
    """Markdown summary of the runs: counts per run, fused calls, differences."""
    import peft

    lines = [f"PEFT {peft.__version__} tests ({peft_root}), selection `{selection}`", "",
             "| run | selected | passed | failed | error | skipped | xfailed | fused calls | tests with fused calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = runs["unpatched-torch"]
    for label, results in runs.items():
        c = counts(results)
        fused, _, routed = call_totals(results)
        extra = f"{fused} | {routed}" if label.startswith("patched") else "- | -"
        lines.append(f"| {label} | {c['selected']} | {c['passed']} | {c['failed']} | {c['error']} | {c['skipped']} | "
                     f"{c['xfailed']} | {extra} |")
    for label, results in runs.items():
        if label.startswith("patched"):
            lines += _differences(label, base, results)
    return "\n".join(lines)


def _differences(label, base, results):
    unexpected, expected, improved = compare(base, results)
    _, fallback, _ = call_totals(results)
    lines = ["", f"{label}: fallbacks by reason: "
             + (", ".join(f"{r}: {n}" for r, n in sorted(fallback.items(), key=lambda kv: -kv[1])) or "none")]
    for nodeid, after, why in expected:
        lines.append(f"- expected difference, {after}: `{nodeid}`: {why}")
    for nodeid, before in improved:
        lines.append(f"- passes patched only (unpatched: {before}): `{nodeid}`")
    for nodeid, after, error in unexpected:
        lines.append(f"- REGRESSION, {after}: `{nodeid}`\n```\n{error}\n```")
    return lines


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selection", choices=sorted(SELECTIONS), default="ci")
    parser.add_argument("--modes", default="torch,interpreter",
                        help="comma-separated patched runs: torch (whole selection), interpreter (its subset)")
    parser.add_argument("--peft-tests", help="PEFT checkout or unpacked sdist (default: fetch the installed version's)")
    parser.add_argument("--online", action="store_true",
                        help="let tests reach the Hugging Face Hub (default: HF_HUB_OFFLINE=1)")
    parser.add_argument("--output-dir", help="logs, results JSON and summary (default: a temporary directory)")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes {sorted(MODES)}; got {args.modes}")
    return args


def _run_all(root, args, out_dir):
    """Run unpatched and patched selections concurrently; returns {label: results}."""
    select, subset = SELECTIONS[args.selection]
    files = _files(select)
    started = [start_run(root, files, select, False, "torch", out_dir, args.online)]
    for mode in args.modes:
        mode_select = select if mode == "torch" else f"(?=.*({select}))(?=.*({subset}))"
        started.append(start_run(root, files, mode_select, True, mode, out_dir, args.online))
    runs = {}
    for label, proc, results in started:
        # pytest's exit status: 0 all passed, 1 some failed (compared below), 2-5 interrupted
        # (e.g. a collection error), internal or usage error, nothing collected.
        if proc.wait() not in (0, 1) or not results.is_file():
            raise RuntimeError(f"{label}: pytest exited with status {proc.returncode}; see {out_dir / label}.log")
        runs[label] = json.loads(results.read_text())
    return runs


def main(argv=None):
    args = _parse(argv)
    out_dir = pathlib.Path(args.output_dir or tempfile.mkdtemp(prefix="peft-suite-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        root = locate_peft_tests(args.peft_tests)
    except (OSError, StopIteration, tarfile.TarError, subprocess.CalledProcessError) as exc:
        print(f"PEFT's tests are not available: {exc!r}", file=sys.stderr)
        return 3
    try:
        runs = _run_all(root, args, out_dir)
    except RuntimeError as exc:
        print(f"PEFT's test suite could not run: {exc}", file=sys.stderr)
        return 2
    summary = report(args.selection, runs, root)
    (out_dir / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"\n{time.monotonic() - start:.0f} s; logs and results in {out_dir}")
    patched = [r for label, r in runs.items() if label.startswith("patched")]
    bad = any(compare(runs["unpatched-torch"], r)[0] for r in patched)
    if any(call_totals(r)[0] == 0 for r in patched):
        print("a patched run made no fused call: the patch routed nothing", file=sys.stderr)
        bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
