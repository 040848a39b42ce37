"""The outstanding GPU figures in one device call (issue 33), run by ``bash scripts/gpu_session.sh all`` on the GPU
machine, or with ``--dry-run`` anywhere on tiny CPU inputs (``tests/scripts/test_gpu_session.py`` runs that in the default
suite, so this script cannot rot).

    python scripts/gpu_session.py [--dry-run] [--out OUT] [--stages eager,nms,...] [--limits tests=200,...]
                                  [--budget 540] [--started-at UNIX_TIME]
    python scripts/gpu_session.py --check-wheels .whl   # every wheel's requirements met by .whl or the device

Stages, in this order; each has its own time limit (``LIMITS``), and none may run past ``--budget`` seconds counted
from ``--started-at`` (the shell wrapper's start, so the wheel install counts too):

  eager        bench_gpu.py, batch 8 and 32, fp32 and 16-mixed: detkit Faster R-CNN, detkit YOLO, torchvision
  nms          bench_gpu.py --nms-only: device NMS against the per-image loop
  simclr       bench_simclr_peer.py: detkit (device views) against lightly, throughput of a short run on CIFAR-10
               (3 epochs of the 10,000 cifar10/train images, batch 512, bf16-mixed; img/s over the whole run)
  tests        make test-gpu (tests/test_cuda.py, whole)
  compiled-8   bench_gpu.py --compile --compile-mode reduce-overhead (CUDA graphs), batch 8, YOLO then Faster R-CNN
  compiled-32  the same at batch 32, on the time that is left (usually none: run it as a second call,
               ``bash scripts/gpu_session.sh all --stages compiled-32 --budget 240``)

A failed or timed-out stage is reported and the next one runs (bench_gpu rows measured before a time-out are kept:
each is printed as JSON the moment it is measured). Everything goes under ``--out``: ``BENCHMARKS_block.md`` (the one
markdown block, also printed last to stdout), ``results.json`` (every stage's status and rows) and ``logs.tar.gz``
(each stage's command, stdout and stderr). Exit status 1 when a stage did not pass.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT / ".gpu_data" / "cifar10_train.tar.gz"  # made by `bash scripts/gpu_session.sh prepare`
ORDER = ["eager", "nms", "simclr", "tests", "compiled-8", "compiled-32"]
# s per stage on the GPU, each also cut to what is left of the budget. Measured on an H200 (2026-11-30): eager's 8
# detkit rows took 100 s before torchvision's 4 (so ~150 s in all), nms 7, simclr 35, tests 115, compiled-8 175 (two
# inductor compiles with CUDA graphs): compiled-32 gets no time, and is its own call (--stages compiled-32)
LIMITS = {"eager": 170, "nms": 25, "simclr": 60, "tests": 150, "compiled-8": 220, "compiled-32": 300}
DRY_LIMITS = {name: 150 for name in ORDER}
RESERVE_S = 10  # kept for the report at the end
MIN_STAGE_S = 15  # a stage that would get less is not started
YOLO_GOAL, BUSY_GOAL, SIMCLR_GOAL, NMS_GOAL = 2 * 196, 0.85, 3 * 4952, 5.0
# the dry run's test selection: fp16 autocast on a CPU takes minutes per test, the compiled run 5; YOLO's are enough
TESTS_DRY_DESELECT = "not 16-mixed and not bf16 and not cuda_graph and not faster_rcnn"

# The packages the device machine's image already holds (/work/.library/device/KINDS.md, read 2026-11-17); a wheel in
# .whl/ may need only these or other wheels of .whl/.
DEVICE_HAS = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split()


@dataclass
class Stage:
    name: str
    title: str
    cmd: list[str]
    kind: str  # bench | nms | simclr | tests
    env: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class Result:
    name: str
    status: str  # ok | failed | timed out | not run
    seconds: float = 0.0
    detail: str = ""
    rows: list = field(default_factory=list)
    lines: list = field(default_factory=list)  # markdown lines of the stage's section
    tail: str = ""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------- the stages
def stages(args: argparse.Namespace, work: Path) -> list[Stage]:
    py, gpu = sys.executable, "scripts/bench_gpu.py"
    if args.dry_run:
        tiny = ["--device", "cpu", "--batches", "1", "--precisions", "32-true", "--image-size", "128", "--steps", "1",
                "--warmup", "1", "--profile-steps", "1", "--threads", "1", "--skip-nms", "--in-process"]
        compiled = ["--compile", "--compile-mode", "reduce-overhead", "--compile-backend", "eager"]  # trace only
        images, note = fake_cifar(work / "fake_cifar"), "generated images"
        simclr = ["--cifar", str(images), "--per-class", "8", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                  "--device", "cpu", "--stem", "standard", "--in-process"]
        test_env = {"DETKIT_TEST_DEVICE": "cpu", "PYTEST_ADDOPTS": f'-k "{TESTS_DRY_DESELECT}"'}
        eager = [*tiny, "--impls", "detkit,torchvision,yolo"]
        c8 = c32 = [*tiny, *compiled, "--impls", "yolo"]
        nms = ["--device", "cpu", "--nms-size", "2,50,4", "--nms-repeats", "2"]
    else:
        eager = ["--impls", "detkit,yolo,torchvision", "--batches", "8,32", "--precisions", "32-true,16-mixed",
                 "--steps", "10", "--warmup", "5", "--skip-nms"]  # torchvision last: the reference, measured before
        compiled = ["--impls", "yolo,detkit", "--precisions", "16-mixed", "--compile", "--compile-mode",
                    "reduce-overhead", "--skip-nms"]
        c8, c32 = [*compiled, "--batches", "8"], [*compiled, "--batches", "32"]
        nms = []
        images, note = cifar(work)
        simclr = ["--cifar", str(images), "--per-class", "1000", "--epochs", "3", "--batch-size", "512",
                  "--workers", "10", "--device", "cuda", "--precision", "bf16-mixed"]
        test_env = {}
    impls = "detkit,lightly"
    if importlib.util.find_spec("lightly") is None and args.dry_run:  # a benchmark-only dependency (extra 'bench')
        impls, note = "detkit", note + "; lightly is not installed here: detkit only"
    simclr += ["--augment-on", "device", "--no-probe", "--impls", impls, "--out", str(work / "simclr")]
    make = ["make", "-o", ".venv/.installed", "test-gpu", f"PY={py}"] if shutil.which("make") else \
        [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_cuda.py"]  # the Makefile's recipe, without make
    # -vv on make's -q: one line per test as it ends, so a time-out still tells which passed
    test_env["PYTEST_ADDOPTS"] = " ".join(filter(None, ["-p no:cacheprovider -vv --durations=5",
                                                        test_env.get("PYTEST_ADDOPTS")]))
    graphs = "bench_gpu.py compiled (reduce-overhead: CUDA graphs)"
    traced = "dry run: the eager backend (tracing only)" if args.dry_run else ""
    b8, b32 = ("", "") if args.dry_run else (", batch 8", ", batch 32")
    return [
        Stage("eager", f"bench_gpu.py eager{b8 and ', batch 8 and 32'}", [py, gpu, *eager], "bench"),
        Stage("nms", "bench_gpu.py --nms-only: the NMS table", [py, gpu, "--nms-only", *nms], "nms"),
        Stage("simclr", "SimCLR throughput: detkit (device views) vs lightly",
              [py, "scripts/bench_simclr_peer.py", *simclr], "simclr", {"TMPDIR": str(work / "tmp")}, note),
        Stage("tests", "make test-gpu (tests/test_cuda.py)", make, "tests", test_env,
              f"dry run: DETKIT_TEST_DEVICE=cpu, -k '{TESTS_DRY_DESELECT}'" if args.dry_run else ""),
        Stage("compiled-8", graphs + b8, [py, gpu, *c8], "bench", note=traced),
        Stage("compiled-32", graphs + b32, [py, gpu, *c32], "bench", note=traced),
    ]


def fake_cifar(root: Path) -> Path:
    """2 classes x 8 random 32 px JPEGs in the cifar10 layout (train/<class>/)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "train" / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "train" / f"class{c}" /
                                                                                   f"{i:04d}.jpg")
    return root


def cifar(work: Path) -> tuple[Path, str]:
    """CIFAR-10 train images from the archive ``prepare`` packed, else ../shared, else the BCCD images as one class."""
    if ARCHIVE.is_file():
        with tarfile.open(ARCHIVE) as t:
            t.extractall(work / "data", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        return work / "data" / "cifar10", f"cifar10/train from {ARCHIVE.relative_to(ROOT)}"
    shared = ROOT.parent / "shared" / "datasets" / "cifar10"
    if (shared / "train").is_dir():
        return shared, "cifar10/train from ../shared"
    folder = work / "bccd_folder" / "train" / "bccd"
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted((ROOT / "data" / "bccd" / "images").iterdir()):
        shutil.copyfile(f, folder / f.name)
    return folder.parents[1], f"no CIFAR archive ({ARCHIVE.relative_to(ROOT)} missing): the BCCD images instead"


# ---------------------------------------------------------------------------------------------------- running
def run_stage(stage: Stage, limit: float, logs: Path) -> tuple[int | None, float]:
    """Run ``stage`` in its own process group, killed (the whole group) after ``limit`` s; (exit status or None when
    timed out, seconds)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    if "TMPDIR" in stage.env:
        Path(stage.env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    (logs / f"{stage.name}.cmd").write_text(
        " ".join(f"{k}={v!r}" for k, v in stage.env.items()) + " " + " ".join(stage.cmd) + f"\n# limit {limit:.0f} s\n")
    t0 = time.monotonic()
    with open(logs / f"{stage.name}.out", "w") as out, open(logs / f"{stage.name}.err", "w") as err:
        p = subprocess.Popen(stage.cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            rc = None
            kill_group(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                kill_group(p.pid, signal.SIGKILL)
                p.wait()
    kill_group(p.pid, signal.SIGKILL)  # what the stage left behind (loader workers, compile workers)
    return rc, time.monotonic() - t0


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, n: int = 15) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if not ln.startswith('{"impl"')]
    return "\n".join(ln[:300] for ln in lines[-n:])


# ---------------------------------------------------------------------------------------------------- reading
def fmt(v, f: str) -> str:
    return "-" if v is None else format(v, f)


def read_bench(res: Result, logs: Path) -> None:
    rows = [json.loads(ln) for ln in (logs / f"{res.name}.err").read_text(errors="replace").splitlines()
            if ln.startswith('{"impl"')]
    res.rows = rows
    out = (logs / f"{res.name}.out").read_text(errors="replace").splitlines()
    header = [ln for ln in out if ln.strip() and not ln.startswith("|")][:1]
    ratios = [ln for ln in out if ln.startswith("detkit/torchvision")]
    names = {"detkit": "detkit Faster R-CNN", "torchvision": "torchvision FasterRCNN", "yolo": "detkit YOLO"}
    lines = [*header, ""] if header else []
    lines += ["| impl | precision | batch | mode | train img/s | infer img/s | peak mem GB | GPU busy | syncs/step | "
              "memcpyAsync/step | launches/step | warm-up s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {names.get(r['impl'], r['impl'])} | {r['precision']} | {r['batch']} | {mode(r)} | "
                     f"{r['train_img_s']:,.1f} | {r['infer_img_s']:,.1f} | {fmt(r['peak_mem_gb'], '.2f')} | "
                     f"{fmt(r.get('gpu_busy'), '.0%')} | {fmt(r.get('syncs_per_step'), '.1f')} | "
                     f"{fmt(r.get('memcpy_per_step'), '.0f')} | {fmt(r.get('launches_per_step'), ',.0f')} | "
                     f"{r['warmup_s']:.1f} |")
    if not rows:
        lines.append("| (no row measured) | | | | | | | | | | | |")
    res.lines = lines + ([""] + ratios if ratios else [])
    res.detail = f"{len(rows)} rows"


def mode(r: dict) -> str:
    return f"compiled ({r.get('compile_mode') or 'default'})" if r.get("compile") else "eager"


def read_nms(res: Result, logs: Path) -> None:
    out = (logs / f"{res.name}.out").read_text(errors="replace").splitlines()
    table = [ln for ln in out if ln.startswith("|")]
    res.lines = table or ["(no table)"]
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        res.rows.append({"path": cells[0], "median_ms": float(cells[1]), "speedup": float(cells[2].rstrip("x")),
                         "same_boxes": cells[3] == "True"})
    if res.rows and not all(r["same_boxes"] for r in res.rows):
        res.status, res.detail = "failed", "kept boxes differ from the loop's"


def read_simclr(res: Result, logs: Path, work: Path) -> None:
    out = (logs / f"{res.name}.out").read_text(errors="replace").splitlines()
    res.lines = [ln for ln in out if ln.startswith(("SimCLR on", "|"))]
    if res.lines and not res.lines[0].startswith("|"):
        res.lines.insert(1, "")
    results = work / "simclr" / "results.json"
    if results.is_file():
        res.rows = json.loads(results.read_text())


def read_tests(res: Result, logs: Path) -> None:
    text = (logs / f"{res.name}.out").read_text(errors="replace") + (logs / f"{res.name}.err").read_text(
        errors="replace")
    summary = [ln.strip("= ") for ln in text.splitlines()
               if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)", ln) and " in " in ln]
    bad = [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    ended = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M)  # -vv, as each test ends
    passed = sum(outcome == "PASSED" for _, outcome in ended)
    if summary:
        res.detail = summary[-1]
        m = re.search(r"(\d+) passed", res.detail)
        passed = int(m.group(1)) if m else 0
    else:  # cut off: what ended before
        res.detail = f"no pytest summary; {passed} passed before the end"
        bad = bad or [f"FAILED {name}" for name, outcome in ended if outcome in ("FAILED", "ERROR")]
    res.lines = [f"`{res.detail}`"] + [f"* {ln[:300]}" for ln in bad]
    res.rows = [{"summary": res.detail, "passed": passed, "failed": bad,
                 "ended": [f"{name} {outcome}" for name, outcome in ended]}]


# ---------------------------------------------------------------------------------------------------- the report
def device_info(dry_run: bool) -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for pkg in ("torch", "torchvision", "lightning"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "?"
    smi = shutil.which("nvidia-smi")
    if smi and not dry_run:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            name, driver, mem = [s.strip() for s in r.stdout.strip().splitlines()[0].split(",")]
            info.update(gpu=name, driver=driver, memory=mem)
    if "gpu" not in info and not dry_run:  # no nvidia-smi: ask torch
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                           capture_output=True, text=True)
        info["gpu"] = r.stdout.strip() or "no CUDA device found"
    if dry_run:
        info["gpu"] = "CPU (dry run)"
    return info


def goals(results: dict[str, Result], dry_run: bool) -> list[str]:
    bench = [r for name in ("eager", "compiled-8", "compiled-32") if name in results for r in results[name].rows]
    names = {"detkit": "detkit Faster R-CNN", "torchvision": "torchvision", "yolo": "detkit YOLO"}
    label = lambda r: f"{names.get(r['impl'], r['impl'])} {r['precision']} {mode(r)}"  # noqa: E731
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    lines = []
    b8 = [r for r in bench if r["batch"] == 8 and r.get("gpu_busy") is not None]
    if b8:
        best = max(b8, key=lambda r: r["gpu_busy"])
        lines.append(f"* GPU busy at batch 8 >= {BUSY_GOAL:.0%}: {met(best['gpu_busy'] >= BUSY_GOAL)}, best "
                     f"{best['gpu_busy']:.0%} ({label(best)})")
    else:
        lines.append(f"* GPU busy at batch 8 >= {BUSY_GOAL:.0%}: not measured")
    yolo8 = [r for r in bench if r["impl"] == "yolo" and r["batch"] == 8]
    if yolo8:
        best = max(yolo8, key=lambda r: r["train_img_s"])
        lines.append(f"* detkit YOLO at batch 8 >= {YOLO_GOAL} img/s (2x 196): {met(best['train_img_s'] >= YOLO_GOAL)}"
                     f", best {best['train_img_s']:,.1f} img/s ({label(best)})")
    else:
        lines.append(f"* detkit YOLO at batch 8 >= {YOLO_GOAL} img/s: not measured")
    ysync = [r for r in bench if r["impl"] == "yolo" and r.get("syncs_per_step") is not None]
    if ysync:
        fp32 = [r for r in ysync if r["precision"] != "16-mixed"]  # 16-mixed: GradScaler reads found_inf once a step
        ok = bool(fp32) and all(r["syncs_per_step"] < 1 for r in fp32)
        lines.append("* 0 host syncs per YOLO step (< 1 per step counted: the profiler's own synchronize is spread "
                     f"over its steps; 16-mixed adds GradScaler's one read): {met(ok)}, " +
                     ", ".join(f"{r['syncs_per_step']:.1f} ({r['precision']}, batch {r['batch']}, {mode(r)})"
                               for r in ysync))
    else:
        lines.append("* 0 host syncs per YOLO step: not measured")
    nms = {r["path"]: r for r in results["nms"].rows} if "nms" in results else {}
    cluster = next((r for p, r in nms.items() if "nms=cluster" in p), None)
    if cluster:
        lines.append(f"* device NMS >= {NMS_GOAL:.0f}x the per-image loop: {met(cluster['speedup'] >= NMS_GOAL)}, "
                     f"{cluster['speedup']:.2f}x, same boxes {cluster['same_boxes']}")
    sim = {r["impl"].split(" ")[0]: r for r in results["simclr"].rows} if "simclr" in results else {}
    if "detkit" in sim:
        d = sim["detkit"]["img_s"]
        text = f"* SimCLR on the device: detkit (device views) {d:,.0f} img/s"
        if "lightly" in sim:
            text += f", lightly {sim['lightly']['img_s']:,.0f} img/s: {d / sim['lightly']['img_s']:.2f}x lightly"
        lines.append(text + f"; >= 3x the H100 run's 4,952 img/s ({SIMCLR_GOAL:,}): {met(d >= SIMCLR_GOAL)}")
    else:
        lines.append("* SimCLR throughput against lightly: not measured")
    if "tests" in results:
        t = results["tests"]
        lines.append(f"* make test-gpu: {t.detail or t.status}")
    if dry_run:
        lines.insert(0, "(dry run: tiny CPU inputs, the figures and verdicts are no measurements)")
    return lines


def report(results: dict[str, Result], info: dict, args: argparse.Namespace, titles: dict, total: float) -> str:
    today = datetime.date.today().isoformat()
    gpu = info["gpu"]
    head = f"## GPU session (issue 33): {gpu}, {today}" + (" — DRY RUN" if args.dry_run else "")
    env = (f"{gpu}" + (f" (driver {info['driver']}, {info['memory']})" if "driver" in info else "") +
           f", {info['cpus']} CPU cores, Python {info['python']}, torch {info['torch']}, torchvision "
           f"{info['torchvision']}, lightning {info['lightning']}")
    lines = [head, "", f"`bash scripts/gpu_session.sh all{' --dry-run' if args.dry_run else ''}` on {env}; "
             f"{total:.0f} s in all.", "",
             "| stage | what | status | s | notes |", "| --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        status = res.status if res.status == "ok" else f"**{res.status.upper()}**"
        notes = "; ".join(filter(None, [res.detail, titles[name][1]]))
        lines.append(f"| {name} | {titles[name][0]} | {status} | {res.seconds:.0f} | {notes} |")
    lines += ["", "### Goals", "", *goals(results, args.dry_run)]
    for name, res in results.items():
        lines += ["", f"### {name}: {titles[name][0]}", ""]
        if res.status != "ok":
            lines += [f"**{res.status.upper()}**{': ' + res.detail if res.detail else ''}", ""]
        lines += res.lines
        if res.status not in ("ok", "not run") and res.tail:
            lines += ["", "```", res.tail, "```"]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- wheels
def check_wheels(folder: Path, python: str = "3.12") -> int:
    """Every requirement of every wheel in ``folder`` (extras aside, markers evaluated for CPython ``python`` on x86-64
    Linux) is met by another wheel there or by a package of the device's image (``DEVICE_HAS``)."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    wheels = sorted(folder.glob("*.whl"))
    have = {norm(w.name.split("-")[0]): w.name for w in wheels}
    missing, dupes = [], {}
    for w in wheels:
        dupes.setdefault(norm(w.name.split("-")[0]), []).append(w.name)
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if norm(req.name) not in have and norm(req.name) not in DEVICE_HAS:
                missing.append(f"{w.name} needs {req}")
    dupes = {k: v for k, v in dupes.items() if len(v) > 1}
    for m in missing:
        print("missing:", m, file=sys.stderr)
    for k, v in dupes.items():
        print(f"two versions of {k}: {v}", file=sys.stderr)
    print(f"{len(wheels)} wheels in {folder}: {'complete' if not missing and not dupes else 'INCOMPLETE'}")
    return 1 if missing or dupes else 0


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("DRY_RUN", "0") not in ("", "0"),
                   help="every stage on tiny CPU inputs (also DRY_RUN=1)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_out"))
    p.add_argument("--work", default=None, help="scratch folder, kept (default: a temporary one, removed at the end)")
    p.add_argument("--stages", default=",".join(ORDER))
    p.add_argument("--limits", default="", help="per-stage time limits in s, e.g. tests=200,compiled-8=180")
    p.add_argument("--budget", type=float, default=None, help="s for everything (default 540; dry run 900)")
    p.add_argument("--started-at", type=float, default=None, help="UNIX time the budget counts from (default now)")
    p.add_argument("--check-wheels", metavar="DIR", help="check a wheel folder's requirements and exit")
    args = p.parse_args()
    if args.check_wheels:
        sys.exit(check_wheels(Path(args.check_wheels), os.environ.get("WHEEL_PYTHON", "3.12")))
    start = args.started_at or time.time()
    budget = args.budget or (900 if args.dry_run else 540)
    limits = dict(DRY_LIMITS if args.dry_run else LIMITS)
    limits.update({k: float(v) for k, v in (kv.split("=") for kv in filter(None, args.limits.split(",")))})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_session_"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    info = device_info(args.dry_run)
    (out / "device.txt").write_text(json.dumps(info, indent=2) + "\n")
    print(f"gpu_session: {info['gpu']}, torch {info['torch']}; budget {budget:.0f} s, "
          f"{time.time() - start:.0f} s spent before the stages", file=sys.stderr, flush=True)
    wanted = args.stages.split(",")
    unknown = set(wanted) - set(ORDER)
    if unknown:
        sys.exit(f"unknown stages {sorted(unknown)}; known: {ORDER}")
    results, titles = {}, {}
    for stage in stages(args, work):
        if stage.name not in wanted:
            continue
        titles[stage.name] = (stage.title, stage.note)
        left = budget - (time.time() - start) - RESERVE_S
        limit = min(limits[stage.name], left)
        res = Result(stage.name, "ok")
        results[stage.name] = res
        if limit < MIN_STAGE_S:
            res.status, res.detail = "not run", f"{max(left, 0):.0f} s left of the {budget:.0f} s budget"
            print(f"gpu_session: {stage.name} not run ({res.detail})", file=sys.stderr, flush=True)
            continue
        print(f"gpu_session: {stage.name} (limit {limit:.0f} s) ...", file=sys.stderr, flush=True)
        rc, res.seconds = run_stage(stage, limit, logs)
        if rc is None:
            res.status, res.detail = "timed out", f"killed after {limit:.0f} s"
        elif rc != 0:
            res.status, res.detail = "failed", f"exit status {rc}"
        detail = res.detail
        try:
            if stage.kind == "bench":
                read_bench(res, logs)
            elif stage.kind == "nms":
                read_nms(res, logs)
            elif stage.kind == "simclr":
                read_simclr(res, logs, work)
            else:
                read_tests(res, logs)
        except Exception as e:  # noqa: BLE001  (an unreadable output is that stage's failure, not the session's)
            res.status, res.detail = "failed", f"output not understood: {type(e).__name__}: {e}"
        if detail and res.detail != detail and res.status != "ok":
            res.detail = f"{detail}; {res.detail}"
        res.tail = tail(logs / f"{stage.name}.err") or tail(logs / f"{stage.name}.out")
        print(f"gpu_session: {stage.name} {res.status} in {res.seconds:.0f} s", file=sys.stderr, flush=True)
    total = time.time() - start
    block = report(results, info, args, titles, total)
    (out / "BENCHMARKS_block.md").write_text(block)
    (out / "results.json").write_text(json.dumps({"device": info, "dry_run": args.dry_run, "seconds": total,
                                                  "stages": {n: vars(r) for n, r in results.items()}}, indent=2))
    with tarfile.open(out / "logs.tar.gz", "w:gz") as t:
        t.add(logs, arcname="logs")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + block)
    sys.exit(0 if all(r.status == "ok" for r in results.values()) else 1)


if __name__ == "__main__":
    main()
