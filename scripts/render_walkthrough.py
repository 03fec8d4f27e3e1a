"""Render the README walkthrough figures from real MRML output (the PyPI package ``slicer-core``, no Qt).

Slicer's desktop application cannot run everywhere, so this script replays the module's workflow on the
module's own sample (the procedural phantom that Sample Data generates, same seed) in a real
``vtkMRMLScene`` and draws what the scene holds:

1. ``01_inputs.png``      CT and SPECT volume nodes (SPECT fused on the CT as a hot colour map);
2. ``02_segment.png``     Bone/Lesion segments written by ``mrml.write_result``, exported back from the
                          segmentation node to a labelmap and drawn with the colours stored in the node;
3. ``03_strokes.png``     a strokes segmentation (``mrml.create_scribble_segmentation``) with a few strokes
                          where the result disagrees with the phantom's truth, read back with
                          ``mrml.read_scribbles``;
4. ``04_refine.png``      the segments after ``RefinementSession.refine`` (applied with ``write_result``),
                          with Dice against the truth before and after;
5. ``05_memberships.png`` the lesion membership volume that "Show memberships" creates, as a heat map.

It also writes the Extension Manager screenshot (``Resources/Screenshots/FCMSegmentation-1.png``), an
overview of steps 1-4. Run: ``python scripts/render_walkthrough.py [--model PATH] [--out DIR]``.
The pictures are renderings of MRML content with matplotlib, not Slicer screenshots.
"""
import argparse
import ast
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
MODULE_FILE = REPO / "FCMSegmentation" / "FCMSegmentation.py"
sys.path.insert(0, str(REPO / "FCMSegmentation"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.legend_handler import HandlerTuple  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402
from scipy import ndimage  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "figures" / "walkthrough"
DEFAULT_SCREENSHOT = REPO / "Resources" / "Screenshots" / "FCMSegmentation-1.png"
FIGURE_NAMES = ("01_inputs", "02_segment", "03_strokes", "04_refine", "05_memberships")
MAX_PNG_BYTES = 300_000
PALETTE_RAMPS = ("hot", "inferno")  # colour maps kept smooth when a PNG has to be reduced to 256 colours

# Looks: Slicer-like dark views; slice-view colours of Slicer's Red (axial) and Green (coronal) views.
WIDTH_IN, DPI = 12.0, 100
BACKGROUND = "#1b1d21"
PANEL = "#000000"
TEXT = "#e8e8e8"
MUTED = "#9aa0a6"
VIEW_COLOURS = {"Axial": "#f34a33", "Coronal": "#6ab146", "Zoom": "#c8c8c8"}
CT_WINDOW = (-350.0, 1150.0)  # HU shown black .. white
SPECT_PERCENTILE = 99.95  # SPECT shown transparent .. white-hot
ZOOM_HALF_MM = 32.0
CROP_MARGIN_MM = 8.0
HALO = [patheffects.withStroke(linewidth=2.0, foreground="black")]


# ------------------------------------------------------------------------------------ module settings

def module_constants(path: Path = MODULE_FILE) -> Dict[str, Any]:
    """Top-level constants of the Slicer module (SAMPLE_SEED, DEFAULT_STEPS, ...), read without importing
    it (it needs Qt), so the figures use exactly the sample and GUI defaults a user gets."""
    constants: Dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return constants


# ---------------------------------------------------------------------------------------- MRML side

@dataclass
class SegmentLayer:
    """A label map exported from a segmentation node: (z, y, x) values 1.. with names and colours."""

    labels: np.ndarray
    names: Dict[int, str]
    colours: Dict[int, Tuple[float, float, float]]


@dataclass
class Walkthrough:
    """Everything the figures show, from the scene, plus the figure paths."""

    figures: Dict[str, Path] = field(default_factory=dict)
    captions: Dict[str, str] = field(default_factory=dict)
    statistics_before: str = ""
    statistics_after: str = ""
    dice_before: Dict[str, float] = field(default_factory=dict)
    dice_after: Dict[str, float] = field(default_factory=dict)
    stroke_voxels: Dict[str, int] = field(default_factory=dict)
    engine_labels_before: Optional[np.ndarray] = None
    mrml_labels_before: Optional[np.ndarray] = None
    mrml_labels_after: Optional[np.ndarray] = None


def export_result_layer(scene, segmentation_node, reference_node) -> SegmentLayer:
    """Our Bone and Lesion segments exported from ``segmentation_node`` to a labelmap on the reference
    volume's grid (1 bone, 2 lesion), with the names and colours the export's colour table carries."""
    import slicer
    import vtk

    from FCMSegmentationLib import mrml

    segmentation = segmentation_node.GetSegmentation()
    segment_ids = [mrml.find_tagged_segment(segmentation, mrml.CLASS_TAG, key) for key in ("bone", "lesion")]
    if None in segment_ids:
        raise RuntimeError(f"{segmentation_node.GetName()}: Bone/Lesion segments missing")
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "FCM walkthrough export")
    try:
        ids = vtk.vtkStringArray()
        for segment_id in segment_ids:
            ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node):
            raise RuntimeError("exporting the segments to a labelmap failed")
        labels = sitk.GetArrayFromImage(mrml.volume_node_to_sitk(labelmap)).astype(np.uint8)
        display = labelmap.GetDisplayNode()
        colour_node = display.GetColorNode() if display is not None else None
        names, colours = {}, {}
        for value, segment_id in enumerate(segment_ids, start=1):
            segment = segmentation.GetSegment(segment_id)
            names[value], colours[value] = segment.GetName(), tuple(segment.GetColor())
            if colour_node is not None and value < colour_node.GetNumberOfColors():
                rgba = [0.0] * 4
                colour_node.GetColor(value, rgba)
                names[value], colours[value] = colour_node.GetColorName(value), tuple(rgba[:3])
        return SegmentLayer(labels, names, colours)
    finally:
        scene.RemoveNode(labelmap)


def paint_strokes(scribble_node, strokes: Dict[str, np.ndarray], reference: sitk.Image) -> None:
    """Write boolean (z, y, x) masks on ``reference``'s grid into the strokes segments (as Paint would)."""
    import slicer

    from FCMSegmentationLib import mrml

    ids = mrml.scribble_segment_ids(scribble_node.GetSegmentation())
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ijk_to_ras = mrml.image_ijk_to_ras(reference)
    for key, mask in strokes.items():
        if mask.any() and not logic.SetBinaryLabelmapToSegment(
                mrml.oriented_mask(mask, ijk_to_ras), scribble_node, ids[key], logic.MODE_REPLACE):
            raise RuntimeError(f"could not paint the {key} strokes")


def scribble_colours(scribble_node) -> Dict[int, Tuple[Tuple[float, float, float], str]]:
    """{stroke code: (colour, segment name)} as stored in the strokes segmentation."""
    from FCMSegmentationLib import mrml

    segmentation = scribble_node.GetSegmentation()
    ids = mrml.scribble_segment_ids(segmentation)
    out = {}
    for key, _, _, code in mrml.SCRIBBLE_CLASSES:
        if key in ids:
            segment = segmentation.GetSegment(ids[key])
            out[code] = (tuple(segment.GetColor()), segment.GetName())
    return out


# --------------------------------------------------------------------------------- simulated user

STROKE_PLAN = (  # (segment key, class label, strokes per plane, min error voxels, brush mm, max length mm)
    ("lesion", 2, 1, 1, 3.0, 8.0),
    ("bone", 1, 3, 4, 2.5, 40.0),
    ("background", 0, 3, 8, 4.0, 50.0),
)
ALWAYS_MARKED = ("lesion",)  # the rare class: a user marks it even where the result already has it


def _segment_mask(shape, spacing_rc, centre, axis, half_length_mm, brush_mm) -> np.ndarray:
    """Pixels within ``brush_mm`` of the segment centre +- half_length * axis (all in mm, (row, col))."""
    rows, cols = np.indices(shape)
    points = np.stack([rows * spacing_rc[0], cols * spacing_rc[1]], axis=-1)
    a = centre - axis * half_length_mm
    b = centre + axis * half_length_mm
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    nearest = a + t[..., None] * ab
    return np.linalg.norm(points - nearest, axis=-1) <= brush_mm


def plane_strokes(pred: np.ndarray, truth: np.ndarray, spacing_rc: Sequence[float],
                  errors_only: bool = True) -> Dict[str, np.ndarray]:
    """A careful user's strokes on one 2-D slice: for the largest regions where ``pred`` disagrees with
    ``truth``, one short brush stroke along the region's long axis, kept inside the true class. The
    lesion (:data:`ALWAYS_MARKED`) gets a stroke even where the result already has it right."""
    spacing_rc = np.asarray(spacing_rc, float)
    strokes = {}
    for key, label, count, min_size, brush_mm, max_length_mm in STROKE_PLAN:
        target = truth == label
        region = target & (pred != label) if errors_only else target
        if key in ALWAYS_MARKED and not region.any():
            region = target
        components, n = ndimage.label(region, structure=np.ones((3, 3)))
        mask = np.zeros(pred.shape, bool)
        if n:
            sizes = ndimage.sum(region, components, range(1, n + 1))
            for index in np.argsort(sizes)[::-1][:count]:
                if sizes[index] < min_size:
                    break
                points = np.argwhere(components == index + 1) * spacing_rc
                centre = points[np.argmin(np.linalg.norm(points - points.mean(axis=0), axis=1))]
                axis, half = np.array([1.0, 0.0]), 0.0
                if len(points) > 1:
                    _, singular, vt = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
                    axis = vt[0]
                    half = min(max_length_mm / 2, 1.5 * singular[0] / np.sqrt(len(points)))
                mask |= _segment_mask(pred.shape, spacing_rc, centre, axis, half, brush_mm) & target
        strokes[key] = mask
    return strokes


def simulate_strokes(pred: np.ndarray, truth: np.ndarray, centre_zyx: Sequence[int],
                     spacing_xyz: Sequence[float]) -> Dict[str, np.ndarray]:
    """3-D stroke masks painted on the axial and coronal slices through ``centre_zyx`` (the views the
    figures show). Falls back to confirming strokes when the result has no error on those slices."""
    sx, sy, sz = spacing_xyz
    z, y, _ = centre_zyx
    for errors_only in (True, False):
        masks = {key: np.zeros(pred.shape, bool) for key, *_ in STROKE_PLAN}
        for key, mask in plane_strokes(pred[z], truth[z], (sy, sx), errors_only).items():
            masks[key][z] |= mask
        for key, mask in plane_strokes(pred[:, y, :], truth[:, y, :], (sz, sx), errors_only).items():
            masks[key][:, y, :] |= mask
        if any(mask.any() for mask in masks.values()):
            return masks
    raise RuntimeError("no stroke could be painted: the truth has no voxel on the chosen slices")


# ------------------------------------------------------------------------------------------ drawing

@dataclass
class Views:
    """Slice positions and crops (mm, LPS) of the three panels: axial, coronal, axial zoom."""

    reference: sitk.Image
    centre: Tuple[int, int, int]  # (z, y, x) index of the slices
    x_range: Tuple[float, float]
    y_range: Tuple[float, float]
    z_range: Tuple[float, float]
    zoom_x: Tuple[float, float]
    zoom_y: Tuple[float, float]

    def coordinates(self, axis: int) -> np.ndarray:
        """Voxel-centre coordinates (mm) along array axis 0 z, 1 y, 2 x."""
        i = 2 - axis
        size = self.reference.GetSize()[i]
        return self.reference.GetOrigin()[i] + self.reference.GetSpacing()[i] * np.arange(size)

    def extent(self, view: str) -> List[float]:
        x = self.coordinates(2)
        half = [s / 2 for s in self.reference.GetSpacing()]
        horizontal = [x[0] - half[0], x[-1] + half[0]]
        if view == "Coronal":
            z = self.coordinates(0)
            return horizontal + [z[0] - half[2], z[-1] + half[2]]
        y = self.coordinates(1)
        return horizontal + [y[-1] + half[1], y[0] - half[1]]

    def plane(self, array: np.ndarray, view: str) -> np.ndarray:
        z, y, _ = self.centre
        return array[:, y, :] if view == "Coronal" else array[z]

    def grid(self, view: str) -> Tuple[np.ndarray, np.ndarray]:
        return self.coordinates(2), self.coordinates(0 if view == "Coronal" else 1)

    def aspect(self, view: str) -> float:
        if view == "Coronal":
            return (self.x_range[1] - self.x_range[0]) / (self.z_range[1] - self.z_range[0])
        if view == "Zoom":
            return (self.zoom_x[1] - self.zoom_x[0]) / (self.zoom_y[1] - self.zoom_y[0])
        return (self.x_range[1] - self.x_range[0]) / (self.y_range[1] - self.y_range[0])


def choose_views(ct: sitk.Image, truth: np.ndarray) -> Views:
    """Slices through the largest lesion (else the bone's centre); crops to the body; zoom on the lesion."""
    if tuple(np.round(ct.GetDirection(), 6)) != (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0):
        raise ValueError("the walkthrough draws axis-aligned (identity-direction) CTs only")
    components, n = ndimage.label(truth == 2)
    if n:
        largest = 1 + int(np.argmax(ndimage.sum(truth == 2, components, range(1, n + 1))))
        centre = ndimage.center_of_mass(components == largest)
    else:
        centre = ndimage.center_of_mass(truth > 0)
    centre_zyx = tuple(int(round(c)) for c in centre)
    origin, spacing = np.array(ct.GetOrigin()), np.array(ct.GetSpacing())
    body = sitk.GetArrayViewFromImage(ct) > -500
    if not body.any():
        body = np.ones(body.shape, bool)

    def span(axis: int) -> Tuple[float, float]:
        i = 2 - axis
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        low = origin[i] + spacing[i] * (present[0] - 0.5) - CROP_MARGIN_MM
        high = origin[i] + spacing[i] * (present[-1] + 0.5) + CROP_MARGIN_MM
        full_low = origin[i] - spacing[i] / 2
        full_high = origin[i] + spacing[i] * (body.shape[axis] - 0.5)
        return max(low, full_low), min(high, full_high)

    z, y, x = centre_zyx
    cx, cy = origin[0] + spacing[0] * x, origin[1] + spacing[1] * y
    half = min(ZOOM_HALF_MM, 0.25 * (span(2)[1] - span(2)[0]))
    return Views(ct, centre_zyx, span(2), span(1), span(0), (cx - half, cx + half), (cy - half, cy + half))


def window(array: np.ndarray) -> np.ndarray:
    return np.clip((array - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0.0, 1.0)


class Figure:
    """A dark figure 1200 px wide: title, three image panels (axial, coronal, zoom), legend and caption."""

    def __init__(self, views: Views, title: str, subtitle: str, caption_lines: int = 2):
        self.views = views
        names = ("Axial", "Coronal", "Zoom")
        aspects = [views.aspect(name) for name in names]
        left, gap, right = 0.2, 0.16, 0.2
        top_in, bottom_in = 0.78, 0.78 + 0.26 * caption_lines
        panel_h = (WIDTH_IN - left - right - 2 * gap) / sum(aspects)
        height = top_in + panel_h + bottom_in
        self.figure = plt.figure(figsize=(WIDTH_IN, height), dpi=DPI, facecolor=BACKGROUND)
        self.height = height
        self.bottom_in = bottom_in
        self.axes: Dict[str, Any] = {}
        x = left
        for name, aspect in zip(names, aspects):
            width = panel_h * aspect
            ax = self.figure.add_axes([x / WIDTH_IN, bottom_in / height, width / WIDTH_IN, panel_h / height])
            ax.set_facecolor(PANEL)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(VIEW_COLOURS[name])
                spine.set_linewidth(1.2 if name == "Zoom" else 0.0)
            self.axes[name] = ax
            x += width + gap
        self.figure.text(left / WIDTH_IN, 1 - 0.3 / height, title, color=TEXT, fontsize=15, weight="bold",
                         va="center", ha="left")
        self.figure.text(left / WIDTH_IN, 1 - 0.6 / height, subtitle, color=MUTED, fontsize=10.5,
                         va="center", ha="left")
        self._frame()

    def _frame(self) -> None:
        v = self.views
        limits = {"Axial": (v.x_range, v.y_range[::-1]), "Coronal": (v.x_range, v.z_range),
                  "Zoom": (v.zoom_x, v.zoom_y[::-1])}
        labels = {"Axial": ("R", "L", "A", "P"), "Coronal": ("R", "L", "S", "I"), "Zoom": ("R", "L", "A", "P")}
        z, y, x = v.centre
        position = {"Axial": f"z = {v.coordinates(0)[z]:.0f} mm", "Coronal": f"y = {v.coordinates(1)[y]:.0f} mm",
                    "Zoom": f"{v.zoom_x[1] - v.zoom_x[0]:.0f} mm wide"}
        for name, ax in self.axes.items():
            ax.set_xlim(*limits[name][0])
            ax.set_ylim(*limits[name][1])
            ax.text(0.0, 1.0, f" {name} ", transform=ax.transAxes, va="top", ha="left", fontsize=9,
                    color="black", weight="bold", bbox={"facecolor": VIEW_COLOURS[name], "edgecolor": "none",
                                                        "pad": 1.5}, zorder=20)
            ax.text(0.99, 0.985, position[name], transform=ax.transAxes, va="top", ha="right", fontsize=8,
                    color=MUTED, zorder=20, path_effects=HALO)
            left, right, top, bottom = labels[name]
            edges = ((left, (0.012, 0.5), ("left", "center")), (right, (0.988, 0.5), ("right", "center")),
                     (top, (0.5, 0.985), ("center", "top")), (bottom, (0.5, 0.015), ("center", "bottom")))
            for text, xy, align in edges:
                ax.text(*xy, text, transform=ax.transAxes, ha=align[0], va=align[1], fontsize=8, color=MUTED,
                        zorder=20, path_effects=HALO)
        zoom = Rectangle((v.zoom_x[0], v.zoom_y[0]), v.zoom_x[1] - v.zoom_x[0], v.zoom_y[1] - v.zoom_y[0],
                         fill=False, edgecolor=VIEW_COLOURS["Zoom"], linewidth=0.9, linestyle=(0, (3, 2)), zorder=15)
        self.axes["Axial"].add_patch(zoom)

    # ----- layers -------------------------------------------------------------------------------
    def image(self, volume: np.ndarray, interpolation: str = "bilinear", **kwargs) -> None:
        """Draw a (z, y, x[, 4]) volume's slice in every panel, in physical (mm) coordinates."""
        for name, ax in self.axes.items():
            origin = "lower" if name == "Coronal" else "upper"
            ax.imshow(self.views.plane(volume, name), extent=self.views.extent(name), origin=origin,
                      interpolation=interpolation, **kwargs)

    def ct(self, hu: np.ndarray) -> None:
        self.image(window(hu), cmap="gray", vmin=0, vmax=1)

    def heat(self, values: np.ndarray, cmap: str, vmax: float, gamma: float, opacity: float, zorder: int = 2):
        """A colour map whose opacity grows with the value (0 transparent), like a fused foreground."""
        fraction = np.clip(values / max(vmax, 1e-9), 0.0, 1.0)
        rgba = plt.get_cmap(cmap)(fraction)
        rgba[..., 3] = opacity * fraction ** gamma
        self.image(rgba, zorder=zorder)

    def labels(self, labels: np.ndarray, colours: Dict[int, Tuple[float, float, float]], fill: float = 0.45,
               outline: float = 1.3, zorder: int = 3, linestyle: str = "solid") -> None:
        for value, colour in colours.items():
            mask = labels == value
            if fill > 0:
                rgba = np.zeros(mask.shape + (4,))
                rgba[mask] = (*colour, fill)
                self.image(rgba, interpolation="nearest", zorder=zorder)
            if outline > 0:
                for name, ax in self.axes.items():
                    plane = self.views.plane(mask, name)
                    if plane.any():
                        xs, ys = self.views.grid(name)
                        ax.contour(xs, ys, plane.astype(float), levels=[0.5], colors=[colour],
                                   linewidths=outline, linestyles=linestyle, zorder=zorder + 1)

    def truth_outline(self, truth: np.ndarray) -> None:
        """The phantom's truth as thin dashed white outlines, in the zoom panel only."""
        ax = self.axes["Zoom"]
        xs, ys = self.views.grid("Zoom")
        for value, width in ((1, 0.8), (2, 1.1)):
            plane = self.views.plane(truth == value, "Zoom")
            if plane.any():
                ax.contour(xs, ys, plane.astype(float), levels=[0.5], colors=["white"], linewidths=width,
                           linestyles=[(0, (2.5, 2))], zorder=8)

    # ----- text ---------------------------------------------------------------------------------
    def legend(self, handles: List[Any], extra: Sequence[Tuple[Any, str]] = ()) -> None:
        """One row of legend entries; ``extra`` adds (handle or tuple of handles, label) pairs."""
        labels = [h.get_label() for h in handles] + [label for _, label in extra]
        handles = list(handles) + [handle for handle, _ in extra]
        legend = self.figure.legend(handles, labels, loc="lower left", ncol=len(handles), frameon=False,
                                    fontsize=9.5, labelcolor=TEXT, handlelength=1.6, columnspacing=1.6,
                                    bbox_to_anchor=(0.2 / WIDTH_IN, (self.bottom_in - 0.48) / self.height),
                                    handler_map={tuple: HandlerTuple(ndivide=None, pad=0.2)})
        legend.set_zorder(30)

    def caption(self, lines: Sequence[str]) -> None:
        for i, line in enumerate(lines):
            self.figure.text(0.2 / WIDTH_IN, (self.bottom_in - 0.66 - 0.26 * i) / self.height, line, color=TEXT,
                             fontsize=10, va="center", ha="left")

    def footer(self, text: str) -> None:
        self.figure.text(1 - 0.2 / WIDTH_IN, 0.12 / self.height, text, color=MUTED, fontsize=7.5, ha="right",
                         va="center")

    def colourbar(self, cmap: str, label: str, vmax: float = 1.0) -> None:
        ax = self.figure.add_axes([1 - 3.2 / WIDTH_IN, (self.bottom_in - 0.42) / self.height, 2.6 / WIDTH_IN,
                                   0.1 / self.height])
        bar = self.figure.colorbar(ScalarMappable(Normalize(0.0, vmax), cmap), cax=ax, orientation="horizontal",
                                   ticks=[0, vmax / 2, vmax])
        bar.ax.set_xticklabels([f"{t:.3g}" for t in (0, vmax / 2, vmax)])
        bar.outline.set_visible(False)
        ax.tick_params(colors=MUTED, labelsize=8, length=2)
        ax.set_title(label, color=TEXT, fontsize=9, pad=3)

    def save(self, path: Path) -> Path:
        return save_png(self.figure, path)


def save_png(figure, path: Path) -> Path:
    """Write the figure as PNG; if it is larger than the budget, as a 256-colour palette PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    plt.close(figure)
    data = buffer.getvalue()
    if len(data) > 0.9 * MAX_PNG_BYTES:  # noisy CT texture: a 256-colour palette, dithered if that fits
        image = Image.open(io.BytesIO(data)).convert("RGB")
        # The palette also sees strips of the heat maps' colour ramps, so small colour bars keep their range.
        ramps = np.concatenate([np.repeat(plt.get_cmap(name)(np.linspace(0, 1, image.width))[None, :, :3], 24, 0)
                                for name in PALETTE_RAMPS])
        sample = Image.new("RGB", (image.width, image.height + ramps.shape[0]))
        sample.paste(image, (0, 0))
        sample.paste(Image.fromarray((ramps * 255).astype(np.uint8)), (0, image.height))
        palette = sample.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        for dither in (Image.Dither.FLOYDSTEINBERG, Image.Dither.NONE):  # dithering needs an explicit palette
            out = io.BytesIO()
            image.quantize(palette=palette, dither=dither).save(out, format="PNG", compress_level=9)
            data = out.getvalue()
            if len(data) <= 0.9 * MAX_PNG_BYTES:
                break
    path.write_bytes(data)
    return path


def patch(colour, label: str, alpha: float = 0.75) -> Patch:
    return Patch(facecolor=(*colour, alpha), edgecolor=colour, label=label)


def dice_text(dice: Dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" if np.isfinite(value) else f"{name} n/a" for name, value in dice.items())


# ------------------------------------------------------------------------------------------ workflow

def run_walkthrough(
    spect: sitk.Image,
    ct: sitk.Image,
    truth: sitk.Image,
    model,
    out_dir: Path,
    steps: int,
    alpha: float,
    beta: float,
    patch_size: int = 96,
    device: str = "cpu",
    sample_name: str = "synthetic SPECT/CT sample",
    model_label: str = "",
    screenshot: Optional[Path] = None,
) -> Walkthrough:
    """Replay Segment -> strokes -> Refine in a real MRML scene and render one PNG per step."""
    import slicer

    from FCMSegmentationLib import mrml
    from FCMSegmentationLib.metrics import dice_per_class, on_grid_of
    from FCMSegmentationLib.refinement import RefinementSession

    out_dir = Path(out_dir)
    record = Walkthrough()
    footer = "Rendered from the MRML scene (slicer-core) with matplotlib, not a Slicer screenshot" + (
        f" · model: {model_label}" if model_label else "")

    # ---- 1. inputs: the volume nodes Sample Data would load
    mrml.ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    spect_node = mrml.sitk_to_volume_node(spect, scene, "FCM synthetic SPECT")
    ct_node = mrml.sitk_to_volume_node(ct, scene, "FCM synthetic CT")
    spect_in = mrml.volume_node_to_sitk(spect_node)  # what the Logic hands to the engine
    ct_in = mrml.volume_node_to_sitk(ct_node)
    truth_array = sitk.GetArrayFromImage(on_grid_of(truth, ct_in)).astype(np.uint8)
    hu = sitk.GetArrayFromImage(ct_in).astype(np.float32)
    fused = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(spect_in, sitk.sitkFloat32), ct_in, sitk.Transform(),
                                                 sitk.sitkLinear, 0.0))
    spect_max = float(np.percentile(fused[fused > 0], SPECT_PERCENTILE)) if (fused > 0).any() else 1.0
    views = choose_views(ct_in, truth_array)

    fig = Figure(views, "1 · Inputs: CT with SPECT fused", "Volume nodes “FCM synthetic CT” (grey) and "
                 "“FCM synthetic SPECT” (hot colour map, resampled into the CT's slices)", caption_lines=1)
    fig.ct(hu)
    fig.heat(fused, "hot", spect_max, gamma=0.9, opacity=0.85)
    fig.colourbar("hot", "SPECT (counts)", spect_max)
    fig.caption([f"{sample_name}. Uptake follows the skeleton; the zoom (dashed box) is centred on the "
                 "phantom's largest lesion."])
    fig.footer(footer)
    record.figures["01_inputs"] = fig.save(out_dir / "01_inputs.png")

    # ---- 2. Segment (what FCMSegmentationLogic.startSegment does)
    session = RefinementSession(spect_in, ct_in, model=model, device=device, patch=patch_size)
    output_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FCM synthetic SPECT FCM segmentation")
    result = session.segment()
    record.statistics_before = mrml.write_result(scene, result, output_node, ct_node).text
    record.engine_labels_before = sitk.GetArrayFromImage(result.labels)
    before = export_result_layer(scene, output_node, ct_node)
    record.mrml_labels_before = before.labels
    record.dice_before = dice_per_class(before.labels, truth_array)
    segment_handles = [patch(before.colours[v], f"{before.names[v]} segment") for v in sorted(before.names)]
    truth_handle = Line2D([], [], color="white", linestyle=(0, (2.5, 2)), linewidth=1.1, label="phantom truth (zoom)")

    fig = Figure(views, "2 · Segment", "The Bone and Lesion segments of the output segmentation node, "
                 "exported back to a labelmap; colours as stored in the node", caption_lines=2)
    fig.ct(hu)
    fig.labels(before.labels, before.colours)
    fig.truth_outline(truth_array)
    fig.legend(segment_handles + [truth_handle])
    record.captions["02_segment"] = record.statistics_before
    fig.caption([f"Statistics (shown under the Segment button): {record.statistics_before}",
                 f"Dice vs the phantom's truth: {dice_text(record.dice_before)}"])
    fig.footer(footer)
    record.figures["02_segment"] = fig.save(out_dir / "02_segment.png")

    # ---- 3. strokes (the module creates the strokes segmentation after the first Segment)
    scribble_node = mrml.create_scribble_segmentation(scene, ct_node)
    strokes = simulate_strokes(before.labels, truth_array, views.centre, ct_in.GetSpacing())
    paint_strokes(scribble_node, strokes, ct_in)
    codes_image = mrml.read_scribbles(scribble_node, ct_node)
    codes = sitk.GetArrayFromImage(codes_image)
    stroke_style = scribble_colours(scribble_node)
    record.stroke_voxels = {stroke_style[c][1]: int((codes == c).sum()) for c in sorted(stroke_style)}

    fig = Figure(views, "3 · Paint strokes", "Strokes segmentation “FCM scribbles” (Background / Bone / Lesion), "
                 "read back with read_scribbles; result shown as outlines", caption_lines=2)
    fig.ct(hu)
    fig.labels(before.labels, before.colours, fill=0.0, outline=1.0)
    fig.labels(codes, {c: style[0] for c, style in stroke_style.items()}, fill=0.95, outline=0.0, zorder=6)
    fig.truth_outline(truth_array)
    fig.legend([patch(colour, f"{name} stroke", 0.95) for colour, name in stroke_style.values()]
               + [Line2D([], [], color=before.colours[1], linewidth=1.3, label="current result")] + [truth_handle])
    painted = ", ".join(f"{name} {count}" for name, count in record.stroke_voxels.items())
    fig.caption(["A simulated user paints a few strokes where the result disagrees with the phantom's truth, "
                 "and one on the lesion,", f"on the two slices shown. Voxels painted: {painted}."])
    fig.footer(footer)
    record.figures["03_strokes"] = fig.save(out_dir / "03_strokes.png")

    # ---- 4. Refine (startRefine: read_scribbles -> session.refine -> write_result, memberships on)
    refined = session.refine(codes_image, steps=steps, alpha=alpha, beta=beta)
    record.statistics_after = mrml.write_result(scene, refined, output_node, ct_node, show_memberships=True).text
    after = export_result_layer(scene, output_node, ct_node)
    record.mrml_labels_after = after.labels
    record.dice_after = dice_per_class(after.labels, truth_array)

    fig = Figure(views, "4 · Refine", f"The same segments after Refine ({steps} fine-tuning steps on the strokes, "
                 f"alpha {alpha:g}); strokes shown as outlines", caption_lines=2)
    fig.ct(hu)
    fig.labels(after.labels, after.colours)
    fig.labels(codes, {c: style[0] for c, style in stroke_style.items()}, fill=0.0, outline=0.8, zorder=6)
    fig.truth_outline(truth_array)
    stroke_lines = tuple(Line2D([], [], color=colour, linewidth=1.6) for colour, _ in stroke_style.values())
    fig.legend(segment_handles + [truth_handle], extra=[(stroke_lines, "strokes (outlines)")])
    change = ", ".join(f"{name} {record.dice_before[name]:.2f} → {record.dice_after[name]:.2f}"
                       for name in record.dice_after)
    fig.caption([f"Statistics: {record.statistics_after}", f"Dice vs the phantom's truth, before → after: {change}"])
    fig.footer(footer)
    record.figures["04_refine"] = fig.save(out_dir / "04_refine.png")

    # ---- 5. memberships: the "FCM membership lesion" volume node made by Show memberships
    membership_node = scene.GetFirstNodeByName("FCM membership lesion")
    if membership_node is None or not membership_node.GetAttribute(mrml.MEMBERSHIP_ATTRIBUTE):
        raise RuntimeError("write_result made no lesion membership volume")
    lesion = sitk.GetArrayFromImage(on_grid_of(mrml.volume_node_to_sitk(membership_node), ct_in))
    fig = Figure(views, "5 · Soft output: lesion membership", "Volume node “FCM membership lesion” (Advanced › "
                 "Show memberships) as a heat map on the CT; 0 transparent, 1 opaque", caption_lines=1)
    fig.ct(hu)
    fig.heat(lesion, "inferno", 1.0, gamma=0.8, opacity=0.95)
    fig.labels(after.labels, {2: after.colours[2]}, fill=0.0, outline=0.9, zorder=6, linestyle="dotted")
    fig.legend([Line2D([], [], color=after.colours[2], linestyle="dotted", linewidth=1.2,
                       label=f"{after.names[2]} segment (membership > other classes)")])
    fig.colourbar("inferno", "lesion membership")
    uncertain = int(((lesion > 0.2) & (lesion < 0.8)).sum())
    fig.caption([f"Values between 0 and 1 show where the network is unsure or a voxel is partly lesion. Here: "
                 f"maximum {float(lesion.max()):.2f}; {uncertain} voxels between 0.2 and 0.8."])
    fig.footer(footer)
    record.figures["05_memberships"] = fig.save(out_dir / "05_memberships.png")

    if screenshot is not None:
        record.figures["screenshot"] = render_overview(
            Path(screenshot), views, hu, fused, spect_max, before, after, codes, stroke_style, truth_array,
            record, sample_name, footer)
    scene.Clear(1)
    return record


def render_overview(path: Path, views: Views, hu, fused, spect_max, before: SegmentLayer, after: SegmentLayer,
                    codes, stroke_style, truth, record: Walkthrough, sample_name: str, footer: str) -> Path:
    """The Extension Manager screenshot: axial views of steps 1-4 in a 2 x 2 grid."""
    aspect = views.aspect("Axial")
    cols, left, gap, top_in, bottom_in = 2, 0.2, 0.16, 0.62, 0.6
    panel_w = (WIDTH_IN - 2 * left - gap) / cols
    panel_h = panel_w / aspect
    height = top_in + 2 * panel_h + gap + 0.34 + bottom_in
    figure = plt.figure(figsize=(WIDTH_IN, height), dpi=DPI, facecolor=BACKGROUND)
    figure.text(left / WIDTH_IN, 1 - 0.32 / height, "FCM Segmentation · bone and lesion segmentation of SPECT/CT",
                color=TEXT, fontsize=15, weight="bold", va="center")
    titles = ("1 · CT + SPECT", "2 · Segment", "3 · Paint strokes", "4 · Refine")
    z = views.centre[0]
    extent = views.extent("Axial")
    for k, title in enumerate(titles):
        row, col = divmod(k, cols)
        y0 = height - top_in - (row + 1) * panel_h - row * (gap + 0.34)
        ax = figure.add_axes([(left + col * (panel_w + gap)) / WIDTH_IN, y0 / height, panel_w / WIDTH_IN,
                              panel_h / height])
        ax.set_facecolor(PANEL)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(window(hu[z]), cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        xs, ys = views.grid("Axial")
        if k == 0:
            fraction = np.clip(fused[z] / spect_max, 0, 1)
            rgba = plt.get_cmap("hot")(fraction)
            rgba[..., 3] = 0.85 * fraction ** 0.7
            ax.imshow(rgba, extent=extent, interpolation="bilinear")
        layer = {1: before, 2: before, 3: before, 4: after}[k + 1]
        if k >= 1:
            for value, colour in layer.colours.items():
                mask = layer.labels[z] == value
                if k != 2:
                    rgba = np.zeros(mask.shape + (4,))
                    rgba[mask] = (*colour, 0.45)
                    ax.imshow(rgba, extent=extent, interpolation="nearest")
                if mask.any():
                    ax.contour(xs, ys, mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.1)
        if k == 2:
            for code, (colour, _) in stroke_style.items():
                rgba = np.zeros(codes[z].shape + (4,))
                rgba[codes[z] == code] = (*colour, 0.95)
                ax.imshow(rgba, extent=extent, interpolation="nearest")
        ax.set_xlim(*views.x_range)
        ax.set_ylim(*views.y_range[::-1])
        ax.text(0.0, 1.0, f" {title} ", transform=ax.transAxes, va="top", ha="left", fontsize=10, color="black",
                weight="bold", bbox={"facecolor": VIEW_COLOURS["Axial"], "edgecolor": "none", "pad": 1.5})
        note = {0: sample_name, 1: record.statistics_before, 2: "Background / Bone / Lesion strokes",
                3: "Dice " + ", ".join(f"{n} {record.dice_before[n]:.2f}→{record.dice_after[n]:.2f}"
                                       for n in record.dice_after)}[k]
        figure.text((left + col * (panel_w + gap)) / WIDTH_IN, (y0 - 0.17) / height, note, color=MUTED,
                    fontsize=9.5, va="center")
    figure.text(1 - left / WIDTH_IN, 0.14 / height, footer, color=MUTED, fontsize=7.5, ha="right", va="center")
    return save_png(figure, path)


# ---------------------------------------------------------------------------------------------- CLI

def model_label(path: Path, card: Dict[str, Any]) -> str:
    """File name plus training progress from the card (a checkpoint says how far training had got)."""
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    done, planned = training.get("steps"), (training.get("config") or {}).get("steps")
    if isinstance(done, int) and isinstance(planned, int) and done < planned:
        return f"{path.name} (training checkpoint, step {done} of {planned})"
    if not isinstance(done, int):
        return path.name
    continued = " continued from another model" if training.get("init_weights_sha256") else ""
    return f"{path.name} ({done} training steps{continued})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    constants = module_constants()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file (default: the shipped default model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--screenshot", default=str(DEFAULT_SCREENSHOT),
                        help="where to write the Extension Manager screenshot ('' to skip)")
    parser.add_argument("--seed", type=int, default=constants["SAMPLE_SEED"],
                        help="phantom seed (default: the module's Sample Data seed)")
    parser.add_argument("--steps", type=int, default=constants["DEFAULT_STEPS"])
    parser.add_argument("--alpha", type=float, default=constants["DEFAULT_ALPHA"])
    parser.add_argument("--beta", type=float, default=constants["DEFAULT_BETA"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from FCMSegmentationLib.modelfile import default_model_path, load_model
    from FCMSegmentationLib.phantoms import generate_phantom

    torch.set_num_threads(max(1, args.threads))
    model_path = Path(args.model) if args.model else default_model_path()
    model = load_model(model_path, "cpu")
    label = model_label(model_path, model.card)
    case = generate_phantom(args.seed)
    record = run_walkthrough(
        case.spect, case.ct, case.truth, model, args.out, args.steps, args.alpha, args.beta,
        patch_size=constants.get("DEFAULT_PATCH", 96),
        sample_name=f"Sample Data “{constants.get('SAMPLE_NAME', 'FCMSyntheticSPECTCT')}” (phantom, seed {args.seed})",
        model_label=label, screenshot=Path(args.screenshot) if args.screenshot else None)
    for name, path in record.figures.items():
        print(f"{name}: {path} ({path.stat().st_size // 1024} KB)")
    print(f"statistics before: {record.statistics_before}")
    print(f"statistics after:  {record.statistics_after}")
    print(f"Dice before: {dice_text(record.dice_before)}; after: {dice_text(record.dice_after)}")
    print(f"stroke voxels: {record.stroke_voxels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
