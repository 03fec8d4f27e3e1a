"""Reading and writing images: files and DICOM series in, atomic writes out.

Writes never leave a half-written file: the image goes to a temporary file beside the target, which is
renamed over it only once complete (``os.replace`` is atomic on one file system).
"""
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence, Union

import SimpleITK as sitk

from .errors import InputError, OutputError

PathLike = Union[str, os.PathLike]

WRITABLE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEGMENT_NAMES = ("Bone", "Lesion")
SEGMENT_COLORS = ((0.945, 0.839, 0.569), (0.863, 0.078, 0.235))  # Slicer's bone colour; crimson


def compound_suffix(path: PathLike) -> str:
    """The image-format suffix of ``path`` (``.nii.gz`` and ``.seg.nrrd`` count as one), lower case."""
    name = Path(path).name.lower()
    for suffix in WRITABLE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def read_image(path: PathLike) -> sitk.Image:
    """Read an image file (NIfTI, NRRD, MHA, a DICOM file) or a DICOM series directory.

    A directory holding several series yields the one with the most files.
    Raises :class:`InputError` with the reason when nothing readable is there.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_dicom_series(path)
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (check the file permissions)")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise InputError(
            f"{path}: not a readable image (expected NIfTI, NRRD, MHA or DICOM): {_first_line(err)}"
        ) from None


def _read_dicom_series(directory: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(directory)) or ()
    if not series:
        raise InputError(f"{directory}: directory holds no DICOM series")
    files = max((reader.GetGDCMSeriesFileNames(str(directory), sid) for sid in series), key=len)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{directory}: DICOM series could not be read: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def check_output_location(path: PathLike, label: str = "output") -> Path:
    """Fail early, with a clear :class:`OutputError`, if ``path`` cannot be written.

    The directory must exist, be a directory and accept a new file: besides ``os.access`` (which says
    yes to root for any permission bits) a probe file is really created and removed, so read-only file
    systems, full disks and ACLs are caught too. An existing directory at ``path`` itself is refused.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.exists():
        raise OutputError(f"{label} {target}: directory {directory} does not exist; create it first")
    if not directory.is_dir():
        raise OutputError(f"{label} {target}: {directory} is a file, not a directory; choose another location")
    if target.is_dir():
        raise OutputError(f"{label} {target}: is an existing directory; give a file name")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{label} {target}: directory {directory} is not writable; choose another location")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OutputError(
            f"{label} {target}: cannot create files in {directory} ({err.strerror or type(err).__name__}); "
            "choose another location"
        ) from None
    return target


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); rename it onto ``path`` on success.

    On any exception (including a cancel or Ctrl-C) the temporary file is removed and ``path`` is left
    as it was. An ``OSError`` while writing or renaming (disk full, permissions) becomes :class:`OutputError`.
    """
    target = check_output_location(path)
    directory = target.parent if str(target.parent) else Path(".")
    suffix = compound_suffix(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=directory)
    except OSError as err:
        raise OutputError(f"{target}: cannot create a file in {directory} ({err.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            os.chmod(tmp, _final_mode(target))
            os.replace(tmp, target)
        except OSError as err:
            raise OutputError(
                f"{target}: could not write ({err.strerror or type(err).__name__}); the previous file, if any, "
                "is unchanged"
            ) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def image_suffix(path: PathLike, label: str = "output") -> str:
    """The image-format suffix of ``path``; raises :class:`OutputError` if it is not one we write."""
    suffix = compound_suffix(path)
    if suffix not in WRITABLE_SUFFIXES:
        raise OutputError(f"{label} {path}: unsupported output format; use one of {', '.join(WRITABLE_SUFFIXES)}")
    return suffix


def _final_mode(target: Path) -> int:
    """The replaced file's permissions, else the usual ones for a new file (``mkstemp`` makes 0600)."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically; ``.seg.nrrd`` gets Slicer segment metadata.

    Raises :class:`OutputError` for an unsupported suffix or an unwritable location.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if suffix == ".seg.nrrd":
        image = with_segment_metadata(image, SEGMENT_NAMES, SEGMENT_COLORS)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as err:
            raise OutputError(f"{path}: could not write: {_first_line(err)}") from None
    return path


def with_segment_metadata(
    labels: sitk.Image, names: Sequence[str], colors: Sequence[Sequence[float]]
) -> sitk.Image:
    """A copy of a label map carrying Slicer ``.seg.nrrd`` keys: segment i+1 is ``names[i]``."""
    out = sitk.Image(labels)
    size = labels.GetSize()
    extent = " ".join(f"0 {n - 1}" for n in size)
    for index, (name, color) in enumerate(zip(names, colors)):
        key = f"Segment{index}_"
        out.SetMetaData(key + "ID", name)
        out.SetMetaData(key + "Name", name)
        out.SetMetaData(key + "Color", " ".join(f"{c:g}" for c in color))
        out.SetMetaData(key + "LabelValue", str(index + 1))
        out.SetMetaData(key + "Layer", "0")
        out.SetMetaData(key + "Extent", extent)
    return out
