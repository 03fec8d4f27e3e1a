"""Shared plumbing of the benchmark scripts: paths, model loading, machine line, report sections."""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "FCMSegmentation"
if str(ENGINE) not in sys.path:
    sys.path.insert(0, str(ENGINE))

SHARED_DATA = REPO.parent / "shared" / "data"
REAL_CT = SHARED_DATA / "realct_dicom" / "ct_dicom"
REAL_LABELS = SHARED_DATA / "realct_dicom" / "totalsegmentator_labels.nii.gz"
DEFAULT_MODEL = ENGINE / "Resources" / "Models" / "fcmseg_default.pt"
CLASSES = ("bone", "lesion")
# seeds of the accuracy benchmark's cases, after BENCHMARK_SEED_BASE: procedural + i, CT-derived + 100 + i
ACCURACY_SEED_OFFSETS = (0, 100)
# the refinement benchmark's domain-shifted cases (SHIFTED_RANGES): procedural + i, CT-derived + i
SHIFTED_SEED_OFFSETS = (200, 250)


def held_out_plan(count: int, have_ct: bool, seed_offsets: Sequence[int] = ACCURACY_SEED_OFFSETS
                  ) -> List[Dict[str, Any]]:
    """``count`` benchmark cases, a third of them CT-derived when the real CT is there (none of 1 case):
    procedural seeds ``BENCHMARK_SEED_BASE + seed_offsets[0] + i``, CT-derived ``... + seed_offsets[1] + i``
    (seeds never used in training)."""
    from FCMSegmentationLib.training import BENCHMARK_SEED_BASE

    n_ct = int(round(count / 3)) if have_ct and count > 1 else 0
    procedural, ct_derived = (BENCHMARK_SEED_BASE + offset for offset in seed_offsets)
    plan = [{"kind": "procedural", "seed": procedural + i} for i in range(count - n_ct)]
    return plan + [{"kind": "ct", "seed": ct_derived + i} for i in range(n_ct)]


def load_benchmark_model(path: Optional[str], random_weights: bool = False):
    """The model to benchmark: ``path`` (default: the shipped model) or, for smoke tests, random weights."""
    from FCMSegmentationLib.modelfile import load_model, random_model

    if random_weights:
        return random_model("cpu", seed=0), "untrained (random weights; smoke test only)"
    model_path = Path(path) if path else DEFAULT_MODEL
    model = load_model(model_path, "cpu")
    card = model.card
    training = card.get("training", {})
    init = training.get("init_weights_sha256")
    steps = f"{training.get('steps', '?')} steps" + (f" continued from weights sha256 {init[:12]}" if init else "")
    parents = card.get("averaged_from")
    if parents:
        shas = ", ".join(str(parent)[:12] for parent in parents)
        steps = f"the mean of {len(parents)} models' weights ({shas}), the last: {steps}"
    described = (f"`{_relative(model_path)}` ({card.get('name', 'model')}, {steps}, "
                 f"weights sha256 {str(card.get('weights_sha256', '?'))[:12]}, created {card.get('created', '?')})")
    return model, described


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def read_real_ct():
    """(CT, TotalSegmentator labels) of the shared real CT, or (None, None) if the data is missing."""
    from FCMSegmentationLib.imageio import read_image

    if not (REAL_CT.is_dir() and REAL_LABELS.is_file()):
        return None, None
    return read_image(REAL_CT), read_image(REAL_LABELS)


def real_ct_for(parser: argparse.ArgumentParser, ct_derived: int):
    """:func:`read_real_ct` for a script asked for ``ct_derived`` CT-derived phantoms: (None, None) when it
    asks for none; a usage error through ``parser`` when it asks for some and the data is missing."""
    if not ct_derived:
        return None, None
    real_ct, real_labels = read_real_ct()
    if real_ct is None:
        parser.error("CT-derived phantoms need ../shared/data/realct_dicom; pass --ct-derived 0 without it")
    return real_ct, real_labels


def add_model_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every benchmark that runs a model on phantoms and writes a report section:
    --quick, --model, --random-weights, --docs (see :func:`docs_folder`) and --threads."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (writes to out/bench-quick by default)")
    parser.add_argument("--model", default=None, help="model file (default: the shipped default model)")
    parser.add_argument("--random-weights", action="store_true", help="untrained network (smoke tests only)")
    parser.add_argument("--docs", type=Path, default=None,
                        help="where benchmarks.md, figures/ and results/ go "
                             "(default docs/, or out/bench-quick with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")


def docs_folder(args: argparse.Namespace) -> Path:
    """Where a run writes benchmarks.md, figures/ and results/: ``--docs``, else docs/ (out/bench-quick for a
    quick run, so that smoke runs never overwrite the published numbers)."""
    return args.docs or (REPO / "out" / "bench-quick" if args.quick else REPO / "docs")


def machine_line() -> str:
    """Where and when the numbers were taken: CPU cores, GPU, torch version, date."""
    import torch

    cores = os.cpu_count() or 0
    gpu = (f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    return (f"{cores}-core CPU (`nproc` = {cores}, torch threads {torch.get_num_threads()}), {gpu}, "
            f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, date {datetime.date.today().isoformat()}")


def command_line() -> str:
    """The exact command that produced this run (relative to the repository root)."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in sys.argv[1:]])


def finite(values: Iterable[float]) -> List[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_sd(values: Iterable[float]) -> Dict[str, Any]:
    """Mean, sample sd and count of the finite values (NaN = undefined Dice, skipped)."""
    kept = finite(values)
    if not kept:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0
    return {"mean": float(np.mean(kept)), "sd": sd, "n": len(kept)}


def fmt_mean_sd(stats: Dict[str, Any], digits: int = 3, show_n: bool = False) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"
    return f"{text} (n={stats['n']})" if show_n else text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path`` so two scripts never rewrite the report at the same time."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: single writer assumed
            pass
        yield


REPORT_TITLE = "# Benchmarks\n\nGenerated by the scripts under `scripts/`; each script rewrites only its own section.\n"


def write_section(report: Path, name: str, body: str, title: str = REPORT_TITLE) -> Path:
    """Replace (or append) the ``name`` section of ``report`` — between BEGIN/END markers — atomically.

    A new report starts with ``title``.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    with _locked(report):
        text = report.read_text(encoding="utf-8") if report.is_file() else title
        if begin in text and end in text and text.index(begin) < text.index(end):
            head, rest = text.split(begin, 1)
            tail = rest.split(end, 1)[1].lstrip("\n")
            text = head + block + ("\n" + tail if tail else "")
        else:
            text = text.rstrip("\n") + "\n\n" + block
        _atomic_write_text(report, text)
    return report


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False, default=_json_default,
                                        allow_nan=True) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def save_figure(figure, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def relative_to_docs(path: Path, docs: Path) -> str:
    try:
        return str(path.resolve().relative_to(docs.resolve()))
    except ValueError:
        return str(path)
