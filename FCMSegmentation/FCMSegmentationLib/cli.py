"""``fcmseg``: the command-line front end of the engine.

Every sub-command exits 0 on success; on a problem the user can fix it prints one line
``error: <what to fix>`` to stderr and exits 2, leaving no partial output file.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from .errors import FCMError
from .imageio import check_output_location, image_suffix

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
    image_suffix(path, label)
    return check_output_location(path, label)


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
    device = resolve_device(args.device)
    if args.random_weights:
        print("warning: untrained network (--random-weights): the result is meaningless", file=sys.stderr)
        model = random_model(device)
    else:
        model = load_model(args.model, device)
    model = _with_chosen_core(model, args)  # before reading the images: a wrong core fails at once
    spect = read_image(args.spect)
    ct = read_image(args.ct) if args.ct else None
    with progress_bar("segment") as progress:
        result = segment(spect, ct, model, device=args.device, patch=args.patch, progress=progress,
                         keep_lesions_outside_bone=args.keep_lesions_outside_bone,
                         complete_cortex_edge=not args.no_cortex_completion, align=not args.no_align,
                         drop_faint_lesions=args.drop_faint_lesions)
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


def _load_for_session(args: argparse.Namespace):
    from .imageio import read_image
    from .inference import resolve_device
    from .modelfile import load_model

    model = _with_chosen_core(load_model(args.model, resolve_device(args.device)), args)
    spect = read_image(args.spect)
    ct = read_image(args.ct) if args.ct else None
    return spect, ct, model


def _with_chosen_core(model, args: argparse.Namespace):
    """``model`` with the lesion core of ``--lesion-core`` if given, else as calibrated."""
    return model if args.lesion_core is None else model.with_lesion_core(args.lesion_core)


def _finish_session(args: argparse.Namespace, session, result, output: Path, save_path: Optional[Path]) -> int:
    from .imageio import write_image

    write_image(result.labels, output)
    if args.memberships:
        write_image(result.memberships, args.memberships)
    if save_path is not None:
        session.save(save_path)
        print(f"wrote fine-tuned model {save_path}")
    print_notes(result.notes)
    record = session.history[-1]
    print(f"wrote {output} ({record.action}: {record.steps} steps, {record.seconds:.2f} s; {result.device})")
    return 0


def _session_outputs(args: argparse.Namespace):
    output = check_output_path(args.output)
    if args.memberships:
        check_output_path(args.memberships, "memberships")
    save_path = Path(args.save_model) if args.save_model else None
    if save_path is not None:
        check_output_location(save_path, "--save-model")
    return output, save_path


def _open_session(args: argparse.Namespace):
    """A refinement session on the images and model the arguments name (computing its features)."""
    from .refinement import RefinementSession, RefineSettings

    spect, ct, model = _load_for_session(args)
    with progress_bar("features") as progress:
        return RefinementSession(spect, ct, model, args.device, RefineSettings(mode=args.mode), progress=progress,
                                 keep_lesions_outside_bone=args.keep_lesions_outside_bone,
                                 complete_cortex_edge=not args.no_cortex_completion, align=not args.no_align,
                                 drop_faint_lesions=args.drop_faint_lesions)


def cmd_refine(args: argparse.Namespace) -> int:
    from .imageio import read_image

    output, save_path = _session_outputs(args)
    scribbles = read_image(args.scribbles)
    session = _open_session(args)
    with progress_bar("refine") as progress:
        result = session.refine(scribbles, steps=args.steps, alpha=args.alpha, progress=progress)
    return _finish_session(args, session, result, output, save_path)


def cmd_adapt(args: argparse.Namespace) -> int:
    output, save_path = _session_outputs(args)
    session = _open_session(args)
    with progress_bar("adapt") as progress:
        result = session.adapt(steps=args.steps, progress=progress)
    return _finish_session(args, session, result, output, save_path)


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantoms import phantom_command

    with progress_bar("phantom") as progress:
        written = phantom_command(args.out, args.seed, args.count, args.from_ct, args.bone_labels,
                                  args.shifted, osem=args.osem, progress=progress)
    for item in written:
        print(f"wrote {item}")
    return 0


def train_config_from_args(args: argparse.Namespace):
    """The :class:`~training.TrainConfig` that ``fcmseg train`` runs with these parsed arguments."""
    from .training import TrainConfig

    return TrainConfig(
        out=args.out, phantoms=args.phantoms, ct_phantoms=args.ct_phantoms, ct_path=args.from_ct,
        bone_labels_path=args.bone_labels, validation_phantoms=args.validation, seed=args.seed,
        steps=args.steps, batch=args.batch, crop=args.crop, learning_rate=args.lr, alpha=args.alpha,
        beta=args.beta, unsupervised=args.unsupervised, class_balance=args.class_balance,
        device=args.device, threads=args.threads, workers=args.workers, checkpoint_every=args.checkpoint_every,
        channels=tuple(args.channels), init=args.init,
        spect_truncation=args.spect_truncation, spect_gain_sd=args.spect_gain_sd, align=args.align,
        thick_ct=args.thick_ct, osem_spect=args.osem_spect, per_lesion_crops=args.per_lesion_crops,
        **({"spacing_mm": args.spacing} if args.spacing is not None else {}),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    config = train_config_from_args(args)
    check_output_location(config.out, "--out")
    with progress_bar("train") as progress:
        train(config, progress=progress, log=lambda line: print(line, file=sys.stderr))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .calibration import write_calibrated_model

    check_output_location(args.out, "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    with progress_bar("calibrate") as progress:
        card = write_calibrated_model(args.model, args.out, args.phantoms, args.ct_phantoms, args.from_ct,
                                      args.bone_labels, args.device, args.osem_spect, args.working_spacings,
                                      progress)
    for used in ("spect_ct", "spect_only"):
        chosen = card["decision"]["calibration"][used]
        print(f"{used}: weights (background, bone, lesion) {chosen['weights']}, lesion core "
              f"{chosen['lesion_core']}, working grid {chosen['working_spacing_mm']:g} mm: bone Dice "
              f"{chosen['reference_bone_dice']:.3f} -> {chosen['bone_dice']:.3f}, lesion Dice "
              f"{chosen['reference_lesion_dice']:.3f} -> {chosen['lesion_dice']:.3f} on {chosen['cases']} phantoms")
    print(f"wrote {args.out}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .averaging import write_average

    check_output_location(args.out, "--out")
    card = write_average(args.models, args.out)
    print(f"wrote {args.out}: the mean of {len(args.models)} models' weights (sha256 "
          f"{card['weights_sha256'][:12]}); calibrate it again with fcmseg calibrate")
    kinds = sorted(card["validation"].get("by_kind", {}))
    print(f"validation ({', '.join(kinds) or 'none: the last model has no training record'}): "
          f"{json.dumps({k: v for k, v in card['validation'].items() if k.endswith('_dice')})}")
    return 0


def _add_labelling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lesion-core", type=float, metavar="FRACTION",
                        help="of each lesion found keep the voxels with at least this fraction of its peak lesion "
                             "membership, as a threshold at a fraction of a lesion's maximum uptake does (0: off; "
                             "default: the model's calibrated core, 0.6 for the shipped model)")
    parser.add_argument("--keep-lesions-outside-bone", action="store_true",
                        help="keep predicted lesions that the CT shows are not in bone (by default they are left out)")
    parser.add_argument("--drop-faint-lesions", action="store_true",
                        help="with a CT, leave out predicted lesions under 0.5 ml whose lesion membership stays "
                             "below 0.7: most are noise, above all in a reconstructed SPECT, a few small true lesions")
    parser.add_argument("--no-cortex-completion", action="store_true",
                        help="label bone as the network's working grid gives it, without putting back from the CT "
                             "the dense bone edge that the grid rounds off")
    parser.add_argument("--no-align", action="store_true",
                        help="use the SPECT where it was recorded, without first undoing a rigid SPECT/CT "
                             "misregistration (patient motion between the scans)")


def _add_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spect", required=True, help="SPECT image file or DICOM directory")
    parser.add_argument("--ct", help="CT image file or DICOM directory (optional)")
    parser.add_argument("--output", required=True, help="label map (.nii.gz, .nrrd, .seg.nrrd, .mha)")
    parser.add_argument("--model", help="model file to start from (default: the shipped model)")
    parser.add_argument("--save-model", help="write the fine-tuned model (with its card) here")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the session's setting)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    parser.add_argument("--memberships", help="also write the soft memberships")
    parser.add_argument("--mode", choices=("head", "full"), default="head",
                        help="fine-tune the head on cached features (fast, default) or the whole network")
    _add_labelling_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmseg",
        description="Segment bone and bone lesions in SPECT/CT with a network trained by a fuzzy C-means loss; "
                    "refine or adapt it on your image; make phantoms, train, calibrate and average models.",
        epilog="Exit status: 0 on success; 2 on a problem you can fix, printed as one line 'error: ...' "
               "(no partial output file is left); 130 when interrupted. "
               "'fcmseg COMMAND --help' gives each command's options.")
    commands = parser.add_subparsers(dest="command", required=True)

    seg = commands.add_parser("segment", help="segment bone and lesions in a SPECT (and optional CT)")
    seg.add_argument("--spect", required=True, help="SPECT image file or DICOM directory")
    seg.add_argument("--ct", help="CT image file or DICOM directory (optional)")
    seg.add_argument("--output", required=True, help="label map (.nii.gz, .nrrd, .seg.nrrd, .mha)")
    seg.add_argument("--model", help="model file (default: the shipped model)")
    seg.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    seg.add_argument("--memberships", help="also write the soft memberships (one component per class)")
    seg.add_argument("--patch", type=int, default=96, help="sliding-window patch size in voxels")
    _add_labelling_arguments(seg)
    seg.add_argument("--random-weights", action="store_true",
                     help="use an untrained network (smoke tests only; output meaningless)")
    seg.set_defaults(handler=cmd_segment)

    ev = commands.add_parser("evaluate", help="per-class Dice of a label map against a truth label map")
    ev.add_argument("--pred", required=True)
    ev.add_argument("--truth", required=True)
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.set_defaults(handler=cmd_evaluate)

    ref = commands.add_parser("refine", help="fine-tune on painted strokes and segment again")
    _add_session_arguments(ref)
    ref.add_argument("--scribbles", required=True,
                     help="stroke map: 0 unpainted, 1 background, 2 bone, 3 lesion (any grid covering the image)")
    ref.add_argument("--alpha", type=float, help="weight of the label loss on painted voxels")
    ref.set_defaults(handler=cmd_refine)

    ada = commands.add_parser("adapt", help="label-free adaptation to this image (RFCM loss only)")
    _add_session_arguments(ada)
    ada.set_defaults(handler=cmd_adapt)

    ph = commands.add_parser("phantom", help="generate simulated SPECT/CT phantoms with truth")
    ph.add_argument("--out", required=True, help="output directory (case_<seed>/ folders are written)")
    ph.add_argument("--seed", type=int, required=True)
    ph.add_argument("--count", type=int, default=1)
    ph.add_argument("--from-ct", help="real CT (file or DICOM directory) for a CT-derived phantom")
    ph.add_argument("--bone-labels", help="bone label map of that CT (TotalSegmentator ids)")
    ph.add_argument("--shifted", action="store_true", help="domain-shifted ranges (PSF, counts, contrast)")
    ph.add_argument("--osem", action="store_true",
                    help="reconstruct the SPECT by OS-EM from noisy projections (default: image-space noise)")
    ph.set_defaults(handler=cmd_phantom)

    tr = commands.add_parser("train", help="train a model on generated phantoms (torchrun for DDP)")
    tr.add_argument("--out", required=True, help="model file to write")
    tr.add_argument("--phantoms", type=int, default=48, help="procedural training phantoms")
    tr.add_argument("--ct-phantoms", type=int, default=0, help="CT-derived training phantoms")
    tr.add_argument("--from-ct", help="real CT for CT-derived phantoms")
    tr.add_argument("--bone-labels", help="its bone label map")
    tr.add_argument("--validation", type=int, default=4, help="held-out validation phantoms")
    tr.add_argument("--seed", type=int, default=1000)
    tr.add_argument("--steps", type=int, default=1500)
    tr.add_argument("--batch", type=int, default=2)
    tr.add_argument("--crop", type=int, default=64, help="training crop side, in working-grid voxels")
    tr.add_argument("--spacing", type=float, default=None,
                    help="working-grid voxel size in mm (default 3; recorded in the card, which segment follows)")
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--alpha", type=float, default=1.0)
    tr.add_argument("--beta", type=float, default=0.0008)
    tr.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    tr.add_argument("--class-balance", type=float, default=0.5,
                    help="label-loss weight of class k is N_k^-balance (0 plain mean, 1 per-class means)")
    tr.add_argument("--unsupervised", action="store_true", help="RFCM loss only (no labels)")
    tr.add_argument("--device", default="auto")
    tr.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    tr.add_argument("--workers", type=int, default=1,
                    help="processes that make the phantoms before training (the phantoms are the same; default 1)")
    tr.add_argument("--init", help="start from this model file's weights (continued training; same --channels)")
    tr.add_argument("--checkpoint-every", type=int, default=250)
    tr.add_argument("--spect-truncation", type=float, default=0.0,
                    help="probability that a crop's SPECT ends at a random axial plane; above 0 the model also "
                         "learns bone beyond the SPECT field, from the CT alone, and segments it (default 0)")
    tr.add_argument("--spect-gain-sd", type=float, default=0.1,
                    help="SD of the log of each crop's random SPECT gain, so that the model does not depend on "
                         "the intensity the SPECT's normalisation gives bone (default 0.1, about +-10%%)")
    tr.add_argument("--align", action="store_true",
                    help="undo each phantom's SPECT/CT misregistration before training, as segment does "
                         "(default off: the network learns from the SPECT as simulated)")
    tr.add_argument("--thick-ct", type=float, default=0.0,
                    help="probability that a phantom's CT is re-sliced at 3-6 mm, as low-dose SPECT/CT CTs often "
                         "are, so that the model copes with thick slices (default 0)")
    tr.add_argument("--osem-spect", type=float, default=0.0,
                    help="probability that a phantom's SPECT is made from noisy projections by OS-EM instead of "
                         "image-space noise, so that the model knows a reconstruction's noise texture (default 0)")
    tr.add_argument("--per-lesion-crops", action="store_true",
                    help="centre lesion crops on a lesion chosen first, each equally likely, instead of on any "
                         "lesion voxel, which favours large lesions (default off)")
    tr.set_defaults(handler=cmd_train)

    cal = commands.add_parser("calibrate", help="choose a model's decision weights on calibration phantoms "
                                                "and write a calibrated copy")
    cal.add_argument("--model", help="model file to calibrate (default: the shipped model)")
    cal.add_argument("--out", required=True, help="calibrated model file to write (same weights)")
    cal.add_argument("--phantoms", type=int, default=16, help="procedural calibration phantoms")
    cal.add_argument("--ct-phantoms", type=int, default=0, help="CT-derived calibration phantoms")
    cal.add_argument("--from-ct", help="real CT for CT-derived phantoms")
    cal.add_argument("--bone-labels", help="its bone label map")
    cal.add_argument("--osem-spect", type=float, default=0.0,
                     help="probability that a calibration phantom's SPECT is reconstructed by OS-EM from noisy "
                          "projections instead of having image-space noise, to suit the decision to reconstructed "
                          "images (default 0)")
    cal.add_argument("--working-spacings", type=float, nargs="+", default=[], metavar="MM",
                     help="working grids' voxel sizes (mm) to choose among per input, the first winning ties; "
                          "each costs a segmentation per phantom (default: the one the model learnt on)")
    cal.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    cal.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    cal.set_defaults(handler=cmd_calibrate)

    avg = commands.add_parser("average", help="average the weights of models trained from one another "
                                              "(a model soup); the result needs fcmseg calibrate again")
    avg.add_argument("models", nargs="+", help="model files (at least two; the last one's card is kept)")
    avg.add_argument("--out", required=True, help="averaged model file to write")
    avg.set_defaults(handler=cmd_average)
    return parser




def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FCMError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("error: out of memory; close other programs, use a smaller --patch, or run on a machine with "
              "more memory (no output was written)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
