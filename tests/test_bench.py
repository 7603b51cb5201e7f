"""The benchmark command: its counters, statistics, progress bar, CLI and output files (CPU, fast)."""

import csv
import json
import sys
import time

import numpy as np
import pytest
import torch

from compacter_kernels.bench import cli, counts, report, timing


# ---- floor bytes and FLOPs, against hand computations ------------------------------------------

@pytest.mark.parametrize("op", ["compacter", "houlsby"])
def test_adapter_floor_bytes_by_hand(op):
    M, d, k, e = 4, 8, 2, 2
    # fwd: read x (32 elements), write y (32), save z (8) = 72; bwd: read dy, x, z, write dx = 104.
    assert counts.floor_bytes(op, "fwd", M, d, k, e) == 72 * 2
    assert counts.floor_bytes(op, "bwd", M, d, k, e) == 104 * 2
    assert counts.floor_bytes(op, "fwd+bwd", M, d, k, e) == 176 * 2


def test_phm_linear_floor_bytes_by_hand():
    M, I, O, e = 3, 16, 4, 4
    # fwd: read x (48), write y (12); bwd: read dy (12) and x (48), write dx (48).
    assert counts.floor_bytes("phm_linear", "fwd", M, I, O, e) == 60 * 4
    assert counts.floor_bytes("phm_linear", "bwd", M, I, O, e) == 108 * 4
    assert counts.floor_bytes("phm_linear", "fwd+bwd", M, I, O, e) == 168 * 4


def test_math_doc_example():
    # benchmarks/NOTES.md: d=768, k=24, M=32768, bf16: fwd floor 102.2 MB, bwd 152.6 MB.
    assert round(counts.floor_bytes("compacter", "fwd", 32768, 768, 24, 2) / 1e6, 1) == 102.2
    assert round(counts.floor_bytes("compacter", "bwd", 32768, 768, 24, 2) / 1e6, 1) == 152.6


def test_flops_by_hand():
    M, d, k = 5, 12, 3
    assert counts.flops("compacter", "fwd", M, d, k) == 2 * (2 * M * d * k)  # two matmuls
    assert counts.flops("houlsby", "bwd", M, d, k) == 4 * (2 * M * d * k)  # dg, dx, dH_down, dH_up
    assert counts.flops("houlsby", "fwd+bwd", M, d, k) == 6 * (2 * M * d * k)
    assert counts.flops("phm_linear", "fwd", M, d, k) == 2 * M * d * k
    assert counts.flops("phm_linear", "bwd", M, d, k) == 2 * (2 * M * d * k)  # dx, dH


def test_counts_reject_unknown_names():
    with pytest.raises(ValueError, match="op must be"):
        counts.floor_bytes("lora", "fwd", 1, 8, 2, 2)
    with pytest.raises(ValueError, match="mode must be"):
        counts.flops("houlsby", "forward", 1, 8, 2)


# ---- statistics and timing ---------------------------------------------------------------------

def test_quantiles_by_hand_and_against_numpy():
    assert timing.quantiles([5, 1, 4, 2, 3]) == pytest.approx([3.0, 1.8, 4.2])
    assert timing.quantiles([7.0]) == [7.0, 7.0, 7.0]
    samples = torch.rand(101, generator=torch.Generator().manual_seed(0)).tolist()
    qs = (0.5, 0.2, 0.8, 0.0, 1.0)
    assert timing.quantiles(samples, qs) == pytest.approx(np.percentile(samples, [100 * q for q in qs]))
    with pytest.raises(ValueError):
        timing.quantiles([])


def test_measure_excludes_setup():
    t = timing.measure(lambda: time.sleep(0.005), lambda _: None, torch.device("cpu"), warmup_ms=0, rep_ms=1)
    assert t.reps >= 5
    assert 0 <= t.p20_ms <= t.median_ms <= t.p80_ms < 5


def test_progress_bar_writes_to_stderr(capsys):
    bar = timing.Progress(2)
    bar.show("first")
    bar.show("second")
    bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert "first" in err and "second" in err and "2/2" in err and "[" in err and err.endswith("\n")


# ---- the command ------------------------------------------------------------------------------

TINY = ["--m", "4,8", "--d", "16", "--k", "8", "--warmup-ms", "0", "--rep-ms", "1", "--no-plot",
        "--providers", "reference,triton,cuda,floor"]


def test_main_writes_json_and_csv(tmp_path, capsys):
    assert cli.main([*TINY, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "median ms" in out and "GB/s" in out and "saved MiB" in out  # the table
    assert "[" in err and "done" in err  # the progress bar
    if not torch.cuda.is_available():
        assert out.splitlines()[0].startswith("no GPU")

    (json_path,) = tmp_path.glob("compacter-bench-*.json")
    (csv_path,) = tmp_path.glob("compacter-bench-*.csv")
    data = json.loads(json_path.read_text())
    meta = data["metadata"]
    for key in ("device", "driver_version", "torch", "triton", "cuda", "git_commit", "date", "copy_bandwidth_gbps",
                "peak_memory", "saved_memory", "command"):
        assert key in meta
    assert meta["copy_bandwidth_gbps"] > 0
    rows = data["rows"]
    by = {(r["op"], r["mode"], r["M"], r["provider"]): r for r in rows}
    for op in counts.OPS:
        for mode in counts.MODES:
            for M in (4, 8):
                ref = by[(op, mode, M, "reference")]
                assert ref["status"] == "ok" and ref["median_ms"] > 0 and ref["gbps"] > 0
                assert ref["speedup_vs_reference"] == pytest.approx(1.0)
                assert ref["floor_bytes"] == counts.floor_bytes(op, mode, M, 16, 8, 4)
                assert by[(op, mode, M, "floor")]["floor_fraction"] == pytest.approx(1.0)
                # Saved for backward, the same forward in every mode (exact counts: tests/test_memory.py).
                assert 0 < ref["saved_mib"] <= ref["saved_total_mib"]
                if op == "houlsby":  # z for gelu and g for the up matmul, (M, k) fp32 each
                    assert ref["saved_mib"] * 2**20 == 2 * M * 8 * 4
                # The bytes the triton kernels move (their model, checked against the interpreter's
                # counts in tests/test_traffic.py), on any machine, whether or not the provider ran.
                counted = by[(op, mode, M, "triton")]["counted_bytes"]
                assert ref["counted_bytes"] is None and by[(op, mode, M, "cuda")]["counted_bytes"] is None
                if op == "phm_linear":
                    assert counted is None
                else:
                    assert counted >= ref["floor_bytes"]
                    assert by[(op, mode, M, "triton")]["counted_vs_floor"] == counted / ref["floor_bytes"]
                for fused in ("triton", "cuda"):
                    r = by[(op, mode, M, fused)]
                    assert r["status"] in ("ok", "skipped")
                    if r["status"] == "skipped":
                        assert r["reason"] and f"skipped: {fused}" in out and r["saved_mib"] is None
                    if not torch.cuda.is_available():
                        assert r["status"] == "skipped" and "no GPU" in r["reason"]
    assert not any(r["provider"] == "reference+compile" for r in rows)  # not asked for

    with open(csv_path) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    assert all(r["device"] == meta["device"] and r["date"] == meta["date"] for r in csv_rows)


def _plot_rows():
    base = dict(op="houlsby", mode="fwd", model="t5-base", d=768, k=24, n=4, rank=1, dtype="bfloat16", status="ok")
    return [{**base, "provider": p, "M": M, "median_ms": t * M} for p, t in (("floor", 1e-4), ("reference", 1e-3))
            for M in (16, 256)] + [{**base, "provider": "triton", "M": 16, "median_ms": None, "status": "skipped"}]


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    (path,) = report.plot(_plot_rows(), tmp_path, "x", "test device")
    assert path.name == "x-t5-base-d768-k24-bfloat16.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_table_marks_noisy_timings_and_gives_the_floor_no_speed_up(capsys):
    rows = [{**r, "p20_ms": r["median_ms"], "p80_ms": r["median_ms"] * (3 if r["provider"] == "reference" else 1),
             "reason": "", "gbps": 1.0, "floor_fraction": 0.5, "speedup_vs_reference": 7.0,
             "speedup_vs_compile": 8.0, "peak_mib": None, "saved_mib": None, "saved_total_mib": None}
            for r in _plot_rows() if r["status"] == "ok"]
    report.print_table(rows, dict(device="cpu", torch="t", triton="t", copy_bandwidth_gbps=1.0, peak_memory="-"))
    out = capsys.readouterr().out
    floor_lines = [line for line in out.splitlines() if " floor " in line]
    assert floor_lines and all("7.00" not in line and "8.00" not in line for line in floor_lines), out
    assert "WARNING: 2 timings spread more than 1.5x from p20 to p80" in out, out


def test_plot_without_matplotlib_says_so_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.plot(_plot_rows(), tmp_path, "x", "test device") == []
    assert capsys.readouterr().out == ('plot skipped: matplotlib is not installed '
                                       '(pip install --no-build-isolation ".[bench]")\n')


def test_plot_json_redraws_a_saved_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main([*TINY, "--out", str(tmp_path)]) == 0  # TINY has --no-plot
    assert not list(tmp_path.glob("*.png"))
    (json_path,) = tmp_path.glob("compacter-bench-*.json")
    capsys.readouterr()
    assert cli.main(["--plot-json", str(json_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert png.name.startswith(json_path.stem) and png.read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == f"wrote {png}\n"


def test_plot_json_rejects_other_files(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text('{"not": "results"}')
    with pytest.raises(SystemExit) as exc:
        cli.main(["--plot-json", str(other)])
    assert exc.value.code == 2 and "not a results JSON of this command (KeyError" in capsys.readouterr().err


def test_e2e_tiny(tmp_path, capsys):
    argv = ["--e2e", "--layers", "1", "--batch", "1", "--seq", "8", "--steps", "1", "--providers", "reference",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out, _ = capsys.readouterr()
    assert "loss first step" in out and "ms of it" in out
    (path,) = tmp_path.glob("compacter-e2e-*.json")
    eager, compiled = json.loads(path.read_text())["rows"]
    assert eager["backend"] == "reference" and eager["status"] == "ok" and eager["first_loss"] > 0
    assert 0 < eager["host_median_ms"]  # host time per step beside the step time
    # The compiled variant (fullgraph=True; CUDA graphs on a GPU): the same first loss.
    assert compiled["backend"] == "reference+compile" and compiled["status"] == "ok"
    assert compiled["loss_matches"]


def test_shape_overrides():
    parser = cli.build_parser()

    def shapes(*argv):
        args = parser.parse_args([*argv, "--preset", "llm-4096"])
        return [(s.d, s.k) for s in cli._shapes(args, parser)]

    assert shapes() == [(4096, 128), (4096, 256)]
    assert shapes("--k", "64") == [(4096, 64)]
    assert shapes("--d", "1024") == [(1024, 32)]  # the paper's reduction 32
    assert shapes("--d", "768,1024", "--k", "16") == [(768, 16), (1024, 16)]


@pytest.mark.parametrize("argv, message", [
    (["--m", "0"], "positive integer"),
    (["--m", "1,abc"], "positive integer"),
    (["--providers", "reference,fastest"], "unknown 'fastest'"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--modes", "fwd,sideways"], "unknown 'sideways'"),
    (["--preset", "gpt-9"], "unknown 'gpt-9'"),
    (["--ops", ""], "comma-separated"),
    (["--d", "30", "--k", "8"], "multiples of --n"),
])
def test_bad_cli_values_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ---- the performance targets ------------------------------------------------------------------

def _target_rows(fwd_fraction, compile_ms):
    """bf16 rows at M=32768 and 64 for one shape: reference, reference+compile, floor, triton; cuda skipped."""
    base = dict(op="compacter", model="t5-base", d=768, k=24, n=4, rank=1, dtype="bfloat16", status="ok",
                reason="", floor_bytes=1, flops=1)
    times = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}
    rows = []
    for M in (64, 32768):
        for mode, t in times.items():
            rows += [{**base, "M": M, "mode": mode, "provider": "floor", "median_ms": t * fwd_fraction},
                     {**base, "M": M, "mode": mode, "provider": "triton", "median_ms": t},
                     {**base, "M": M, "mode": mode, "provider": "reference", "median_ms": 10 * t},
                     {**base, "M": M, "mode": mode, "provider": "cuda", "median_ms": None, "status": "skipped",
                      "reason": "no GPU"}]
            if compile_ms is not None:
                rows.append({**base, "M": M, "mode": mode, "provider": "reference+compile", "median_ms": compile_ms})
            # fp32 rows are not judged
            rows.append({**base, "M": M, "mode": mode, "provider": "triton", "median_ms": 99.0, "dtype": "float32"})
    report.add_derived(rows)
    return rows


def test_target_checks_judge_each_target(tmp_path):
    checks = report.target_checks(_target_rows(fwd_fraction=0.75, compile_ms=3.0))
    got = {(c["provider"], c["target"]): c for c in checks}
    assert len(checks) == 2 * len(report.TARGETS)  # triton and cuda, one shape
    assert got[("triton", "fwd, fraction of the floor")]["status"] == "missed"  # 75% < 80%
    assert got[("triton", "fwd, fraction of the floor")]["value"] == pytest.approx(0.75)
    assert got[("triton", "bwd, fraction of the floor")]["status"] == "met"  # 75% >= 70%
    assert got[("triton", "fwd+bwd, speed-up over eager")]["status"] == "met"  # 10x
    assert got[("triton", "fwd+bwd, speed-up over torch.compile")]["status"] == "missed"  # 1.0x
    assert got[("triton", "fwd at M=64, speed-up over eager")]["status"] == "met"
    assert all(c["status"] == "not measured" and c["reason"] == "cuda: no GPU"
               for c in checks if c["provider"] == "cuda")
    md = report.targets_markdown(checks)
    assert "| compacter | 768 | 24 | triton | fwd, fraction of the floor | 80% | 75% | missed |" in md
    assert md.rstrip().endswith("Targets: 3 met, 2 missed, 5 not measured.")
    meta = dict(device="GPU-X", driver_version="1", torch="t", triton="tr", cuda="c", git_commit="abc", date="today")
    *_, md_path = report.write_files([], meta, tmp_path, "run", checks)
    assert md_path.name == "run-targets.md"
    assert md_path.read_text() == "GPU-X, torch t, triton tr, commit abc, today\n\n" + md


def test_target_checks_without_the_compared_row():
    checks = report.target_checks(_target_rows(fwd_fraction=0.9, compile_ms=None))
    (c,) = [c for c in checks if c["provider"] == "triton" and "torch.compile" in c["target"]]
    assert c["status"] == "not measured" and "was not timed" in c["reason"]
    assert "none judged" in report.targets_markdown([])


def test_targets_preset_is_the_targets_sizes():
    parser = cli.build_parser()
    args = parser.parse_args(["--preset", "targets"])
    shapes = {(s.d, s.k) for s in cli._shapes(args, parser)}
    assert shapes == {(d, d // 32) for d in (768, 1024, 4096)} | {(d, d // 16) for d in (768, 1024, 4096)}
    assert set(cli.PRESETS["targets"][1]) == {M for _, _, M, _, _ in report.TARGETS}


def test_interrupt_keeps_what_was_measured(tmp_path, capsys, monkeypatch):
    calls = []
    measure = timing.measure

    def interrupted_in_the_third_timing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the first call measures the copy bandwidth
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(timing, "measure", interrupted_in_the_third_timing)
    assert cli.main([*TINY, "--providers", "reference,floor", "--out", str(tmp_path)]) == 130
    out, _ = capsys.readouterr()
    assert "interrupted: reporting the 2 timings made so far" in out
    data = json.loads(next(tmp_path.glob("compacter-bench-*.json")).read_text())
    assert data["metadata"]["interrupted"] is True
    timed = [r for r in data["rows"] if r["provider"] == "reference"]
    assert [r["status"] for r in timed] == ["ok", "ok", "skipped"] and timed[-1]["reason"] == "interrupted"
    assert all(r["median_ms"] > 0 for r in timed[:2])


def test_host_benchmark_runs_and_reports_both_bare_ratios(tmp_path):
    """compacter-bench --host in a process of its own (it stubs Triton's launches for good)."""
    import subprocess
    import sys

    from utils import checkout_env

    env = {**checkout_env(), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "compacter_kernels.bench.host", "--reps", "3", "--calls", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x bare-grads" in run.stdout
    (path,) = tmp_path.glob("compacter-host-*.json")
    rows = json.loads(path.read_text())["rows"]
    providers = {(r["op"], r["mode"], r["provider"]) for r in rows}
    for op in ("compacter", "houlsby", "phm_linear"):
        for mode in ("fwd", "fwd+bwd"):
            assert {(op, mode, p) for p in ("ours", "reference", "bare", "bare-grads")} <= providers
    assert all(r["x_bare"] > 0 and r["x_bare_grads"] > 0 for r in rows)


def test_multitask_benchmark_counts_launches_fused_against_the_loop(tmp_path):
    """compacter-bench --multitask in a process of its own (it stubs Triton's launches for the
    host-time pass): fused, two launches forward (three more backward); the loop, one (four) per
    task present; AdapterHub's BatchSplit before and after fuse_adapters."""
    import subprocess
    import sys

    from utils import checkout_env, installed

    env = {**checkout_env(), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "compacter_kernels.bench.multitask", "--tasks", "1,4", "--reps", "1",
                          "--calls", "1", "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    (path,) = tmp_path.glob("compacter-multitask-*.json")
    rows = {(r["tasks"], r["mode"], r["provider"]): r for r in json.loads(path.read_text())["rows"]}
    # Fused: one task is the single-task op; more, the grouping launch and then the same kernels.
    assert rows[(1, "fwd", "fused")]["launches"] == 1 and rows[(1, "fwd+bwd", "fused")]["launches"] == 4
    assert rows[(4, "fwd", "fused")]["launches"] == 2 and rows[(4, "fwd+bwd", "fused")]["launches"] == 5
    assert rows[(1, "fwd", "loop")]["launches"] == 1
    assert 1 < rows[(4, "fwd", "loop")]["launches"] <= 4  # one per task present
    assert rows[(4, "fwd+bwd", "loop")]["launches"] == 4 * rows[(4, "fwd", "loop")]["launches"]
    assert all(r["host_median_us"] > 0 and r["gpu_median_ms"] is None for r in rows.values())
    # The eager per-task loop (AdapterHub's unfused BatchSplit computation): no Triton launch,
    # torch ops per task instead; fused, at most a few (validation) whatever T.
    assert rows[(4, "fwd+bwd", "eager-loop")]["launches"] == 0
    assert rows[(4, "fwd+bwd", "eager-loop")]["aten_ops"] > rows[(1, "fwd+bwd", "eager-loop")]["aten_ops"] > 0
    # AdapterHub's own BatchSplit (a one-layer BERT, two adapter sites): no Triton launch; after
    # fuse_adapters each site is one fused call, so twice the fused op's launches, and fewer aten ops.
    if not installed("adapters"):
        pytest.skip("adapters is not installed")
    for T, mode in ((1, "fwd"), (4, "fwd"), (4, "fwd+bwd")):
        library, fused = rows[(T, mode, "hub-batchsplit")], rows[(T, mode, "hub-fused")]
        assert library["launches"] == 0 and fused["launches"] == 2 * rows[(T, mode, "fused")]["launches"]
        assert fused["baseline"] == "hub-batchsplit" and fused["host_x_baseline"] > 0
    assert rows[(4, "fwd+bwd", "hub-fused")]["aten_ops"] < rows[(4, "fwd+bwd", "hub-batchsplit")]["aten_ops"]
    assert rows[(4, "fwd+bwd", "fused")]["aten_ops"] <= 8 < rows[(4, "fwd+bwd", "eager-loop")]["aten_ops"]


def _git(cwd, *args):
    import subprocess

    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_git_commit_of_an_installed_copy(tmp_path, monkeypatch):
    """The results' git_commit: COMPACTER_KERNELS_COMMIT; else the checkout the package runs from;
    else the commit setup.py recorded at build time; else a checkout of this project in the working
    directory; else None (never another repository's HEAD)."""
    import shutil
    import types

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.delenv("COMPACTER_KERNELS_COMMIT", raising=False)
    clone, other = tmp_path / "clone", tmp_path / "other"  # a clone of this project; another repository
    (clone / "compacter_kernels").mkdir(parents=True)
    (clone / "compacter_kernels" / "__init__.py").write_text("")
    other.mkdir()
    for repo in (clone, other):
        (repo / "setup.py").write_text("")
        _git(repo, "init", "-q")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "one")
    head = _git(clone, "rev-parse", "HEAD")
    # A non-editable install into a virtual environment inside the clone: its site-packages is no checkout.
    site = clone / ".venv" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(report, "_PACKAGE_PARENT", site)
    built = types.SimpleNamespace(GIT_COMMIT="b" * 40)  # what setup.py writes into compacter_kernels/_build_info.py
    monkeypatch.setitem(sys.modules, "compacter_kernels._build_info", built)

    monkeypatch.chdir(clone)
    assert report.git_commit() == "b" * 40  # the commit it was built from, not the clone's HEAD now
    monkeypatch.setenv("COMPACTER_KERNELS_COMMIT", "from-env")
    assert report.git_commit() == "from-env"
    monkeypatch.delenv("COMPACTER_KERNELS_COMMIT")

    monkeypatch.setitem(sys.modules, "compacter_kernels._build_info", None)  # built without git: no record
    assert report.git_commit() == head
    monkeypatch.chdir(site)  # anywhere in the clone
    assert report.git_commit() == head
    assert report.metadata(torch.device("cpu"), "test")["git_commit"] == head
    monkeypatch.chdir(other)
    assert report.git_commit() is None
    monkeypatch.chdir(tmp_path)  # no repository at all
    assert report.git_commit() is None

    monkeypatch.setattr(report, "_PACKAGE_PARENT", clone)  # an editable install: the checkout it runs from
    monkeypatch.setitem(sys.modules, "compacter_kernels._build_info", built)
    monkeypatch.chdir(other)
    assert report.git_commit() == head
