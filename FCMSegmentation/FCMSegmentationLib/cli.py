"""``fcmseg``: the command-line front end of the engine.

Every sub-command exits 0 on success; on a problem the user can fix it prints one line
``error: <what to fix>`` to stderr and exits 2, leaving no partial output file.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from .errors import FCMError, OutputError
from .imageio import WRITABLE_SUFFIXES, compound_suffix

EXIT_USAGE = 2


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[float, str], None]]:
    """A tqdm bar on stderr driven by the engine's ``progress(fraction, message)`` callback."""
    from tqdm import tqdm

    with tqdm(total=1000, desc=description, unit="‰", file=sys.stderr, leave=False,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}") as bar:
        def update(fraction: float, message: str) -> None:
            bar.n = int(fraction * 1000)
            bar.set_postfix_str(message, refresh=False)
            bar.refresh()

        yield update


def check_output_path(path: str, label: str = "output") -> Path:
    """Fail before any work if ``path`` cannot be written (format or directory)."""
    target = Path(path)
    if compound_suffix(target) not in WRITABLE_SUFFIXES:
        raise OutputError(f"{label} {target}: unsupported format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise OutputError(f"{label} {target}: directory {directory} does not exist; create it first")
    return target


def print_notes(notes: List[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_segment(args: argparse.Namespace) -> int:
    from .imageio import read_image, write_image
    from .inference import resolve_device
    from .modelfile import load_model, random_model
    from .segmentation import segment

    output = check_output_path(args.output)
    memberships_path = check_output_path(args.memberships, "memberships") if args.memberships else None
    spect = read_image(args.spect)
    ct = read_image(args.ct) if args.ct else None
    device = resolve_device(args.device)
    if args.random_weights:
        print("warning: untrained network (--random-weights): the result is meaningless", file=sys.stderr)
        model = random_model(device)
    else:
        model = load_model(args.model, device)
    with progress_bar("segment") as progress:
        result = segment(spect, ct, model, device=args.device, patch=args.patch, progress=progress)
    write_image(result.labels, output)
    if memberships_path is not None:
        write_image(result.memberships, memberships_path)
    print_notes(result.notes)
    print(f"wrote {output} ({result.device})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .imageio import read_image
    from .metrics import evaluate_images

    scores = evaluate_images(read_image(args.pred), read_image(args.truth))
    if args.json:
        # NaN (class absent from both) is not JSON: null says "undefined".
        print(json.dumps({name: (None if value != value else value) for name, value in scores.items()}))
    else:
        for name, value in scores.items():
            print(f"{name:>10s} Dice {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcmseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment bone and lesions in a SPECT (and optional CT)")
    seg.add_argument("--spect", required=True, help="SPECT image file or DICOM directory")
    seg.add_argument("--ct", help="CT image file or DICOM directory (optional)")
    seg.add_argument("--output", required=True, help="label map (.nii.gz, .nrrd, .seg.nrrd, .mha)")
    seg.add_argument("--model", help="model file (default: the shipped model)")
    seg.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    seg.add_argument("--memberships", help="also write the soft memberships (one component per class)")
    seg.add_argument("--patch", type=int, default=96, help="sliding-window patch size in voxels")
    seg.add_argument("--random-weights", action="store_true",
                     help="use an untrained network (smoke tests only; output meaningless)")
    seg.set_defaults(handler=cmd_segment)

    ev = commands.add_parser("evaluate", help="per-class Dice of a label map against a truth label map")
    ev.add_argument("--pred", required=True)
    ev.add_argument("--truth", required=True)
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(handler=cmd_evaluate)
    return parser




def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FCMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
