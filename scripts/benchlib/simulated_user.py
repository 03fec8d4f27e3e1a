"""A simulated user who paints short strokes, as a person correcting a segmentation would.

Each stroke is a short straight line (``length_mm``, default 5-15 mm) a few voxels thick (a disc of
``radius_voxels`` around the line, in the plane), lying on one axial, coronal or sagittal plane,
entirely inside one wrongly-labelled connected region and painted with that region's *true* class:

* error regions are the connected components of ``truth == t & prediction == p`` (t != p): a false
  negative of class t and a false positive of class p at once, painted with code t + 1;
* each foreground class (bone, lesion) owns the components where it is the truth (its false negatives,
  "missed") or the prediction (its false positives, "false"); strokes go round-robin over the classes,
  the class with the lowest Dice first, each class alternating between its largest missed region and its
  largest false one (starting with whichever is larger) — a person both adds what was missed and erases
  what is wrong, rather than spending a round on one kind;
* when every region has a stroke and more are asked for, the largest regions get another one, at least
  ``spread_mm`` from earlier strokes of the same class;
* within a component the stroke is centred on its deepest point (largest distance to the region's edge,
  in mm; away from earlier strokes), on the plane where the component's cross-section there is largest,
  along the principal axis of that cross-section, and stops where the region ends.

With ``prediction=None`` nothing is labelled yet: the user paints *seeds* — strokes inside the largest
regions of each class including background (what one paints before Slicer's Grow-from-seeds). With
``confirming=True`` the user paints inside the largest regions the prediction already labels right
(``truth == prediction == k``), confirming them, as people also do.

Codes (the engine's scribbles convention): 0 none, 1 background, 2 bone, 3 lesion.
"""
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

PLANES = ("axial", "coronal", "sagittal")  # the array axis held fixed: z, y, x
SEEDS_PER_CLASS = 3  # seed strokes per class that a user paints on an unlabelled image (seed_strokes)


@dataclass
class Stroke:
    code: int  # 1 background, 2 bone, 3 lesion (= true class + 1)
    true_class: int
    predicted_class: Optional[int]  # None when painting seeds
    plane: str
    centre_zyx: Tuple[int, int, int]
    length_mm: float
    voxels: int
    component_voxels: int

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def _class_dice(truth: np.ndarray, prediction: np.ndarray, k: int) -> float:
    t, p = truth == k, prediction == k
    total = int(t.sum()) + int(p.sum())
    return float("nan") if total == 0 else 2.0 * int((t & p).sum()) / total


def _components(mask: np.ndarray, min_voxels: int):
    """[(size, slices, label_id, labelled_subarray)] of the connected components (26-connected)."""
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return []
    sizes = np.bincount(labelled.ravel())[1:]
    boxes = ndimage.find_objects(labelled)
    return [(int(sizes[i]), boxes[i], i + 1, labelled) for i in range(count) if sizes[i] >= min_voxels]


def _stroke_in_component(component: np.ndarray, offset: np.ndarray, spacing_zyx: np.ndarray,
                         avoid: Optional[np.ndarray], rng: np.random.Generator, length_range: Sequence[float],
                         radius_voxels: int) -> Optional[Tuple[np.ndarray, str, Tuple[int, int, int], float]]:
    """(voxel indices (N, 3) in the full array, plane, centre, length) of one stroke, or None."""
    available = component if avoid is None else component & ~avoid
    if not available.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(available, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    centre = np.array(np.unravel_index(int(np.argmax(depth)), depth.shape))
    # the plane with the largest cross-section of the component through the centre
    areas = []
    for axis in range(3):
        plane_mask = np.take(component, centre[axis], axis=axis)
        in_plane = [a for a in range(3) if a != axis]
        areas.append(plane_mask.sum() * spacing_zyx[in_plane[0]] * spacing_zyx[in_plane[1]])
    axis = int(np.argmax(areas))
    in_plane = [a for a in range(3) if a != axis]
    plane_mask = np.take(component, centre[axis], axis=axis)
    plane_spacing = spacing_zyx[in_plane]
    rows, cols = np.nonzero(plane_mask)
    points_mm = np.stack([rows, cols], 1) * plane_spacing
    centre_2d = centre[in_plane]
    if len(points_mm) >= 2:
        centred = points_mm - points_mm.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        direction = vt[0]
    else:
        direction = np.array([0.0, 1.0])
    length = float(rng.uniform(*length_range))
    step = 0.25 * float(plane_spacing.min())
    line = [tuple(centre_2d)]
    for sign in (1.0, -1.0):  # walk out from the centre both ways, stopping where the region ends
        t = step
        while t <= length / 2.0:
            position = centre_2d * plane_spacing + sign * t * direction
            index = np.rint(position / plane_spacing).astype(int)
            if np.any(index < 0) or np.any(index >= plane_mask.shape) or not plane_mask[tuple(index)]:
                break
            line.append(tuple(index))
            t += step
    line_mask = np.zeros(plane_mask.shape, bool)
    line_mask[tuple(np.array(sorted(set(line))).T)] = True
    ends = np.array(sorted(set(line)))
    painted_length = float(np.linalg.norm((ends.max(0) - ends.min(0)) * plane_spacing)) + float(plane_spacing.min())
    if radius_voxels > 0:
        disc = np.ones((2 * radius_voxels + 1,) * 2, bool)
        line_mask = ndimage.binary_dilation(line_mask, disc)
    line_mask &= plane_mask
    rows, cols = np.nonzero(line_mask)
    voxels = np.zeros((len(rows), 3), dtype=np.int64)
    voxels[:, axis] = centre[axis]
    voxels[:, in_plane[0]] = rows
    voxels[:, in_plane[1]] = cols
    return voxels + offset, PLANES[axis], tuple(int(c) for c in centre + offset), painted_length


def paint_strokes(truth: np.ndarray, prediction: Optional[np.ndarray], spacing_xyz: Sequence[float], count: int,
                  rng: np.random.Generator, painted_codes: Optional[np.ndarray] = None,
                  allowed: Optional[np.ndarray] = None, length_mm: Sequence[float] = (5.0, 15.0),
                  radius_voxels: int = 1, min_component_voxels: int = 4, spread_mm: Optional[float] = None,
                  classes: Optional[Sequence[int]] = None, class_allowed: Optional[Dict[int, np.ndarray]] = None,
                  confirming: bool = False) -> Tuple[np.ndarray, List[Stroke]]:
    """Up to ``count`` new strokes as a uint8 code array (0 none, 1 background, 2 bone, 3 lesion) of
    ``truth``'s shape, and their descriptions. See the module docstring.

    truth, prediction: (z, y, x) class arrays (0/1/2) on one grid with voxel size ``spacing_xyz`` (mm).
    painted_codes: the strokes of earlier rounds (codes); never repainted, and a new stroke keeps
    ``spread_mm`` (default 25 mm for seeds, 10 mm for corrections) from earlier strokes of its own code,
    so repeated strokes in one region spread out. allowed: where strokes may go (e.g. the
    SPECT's field of view; None = everywhere). class_allowed: further limits for strokes of one true class
    (e.g. background seeds only inside the body, where a person paints them). classes: the classes served
    round-robin (default (1, 2) for corrections, (0, 1, 2) for seeds). confirming: paint inside regions the
    prediction labels right.
    """
    truth = np.asarray(truth)
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    seeding = prediction is None
    if seeding and confirming:
        raise ValueError("confirming strokes need a prediction to confirm")
    spread_mm = (25.0 if seeding else 10.0) if spread_mm is None else float(spread_mm)
    classes = tuple(classes) if classes is not None else ((0, 1, 2) if seeding else (1, 2))
    painted = np.zeros(truth.shape, bool)
    allowed = np.ones(truth.shape, bool) if allowed is None else allowed.astype(bool)
    codes = np.zeros(truth.shape, np.uint8)
    painted_code = (np.zeros(truth.shape, np.uint8) if painted_codes is None
                    else np.asarray(painted_codes, np.uint8).copy())
    painted |= painted_code > 0
    strokes: List[Stroke] = []
    if count <= 0:
        return codes, strokes

    # candidate regions, per served class k: "missed" (truth k, predicted otherwise: false negatives) and
    # "false" (predicted k, truth otherwise: false positives); "seed" (truth k) when painting seeds;
    # "right" (truth and prediction k) when confirming
    queues: Dict[Tuple[int, str], List[Tuple[int, int, Optional[int], tuple]]] = {}
    pairs = ([(t, None) for t in classes] if seeding else [(t, t) for t in classes] if confirming else
             [(t, p) for t in range(3) for p in range(3) if t != p])
    for t, p in pairs:
        mask = (truth == t) & allowed & ~painted
        if class_allowed is not None and t in class_allowed:
            mask &= np.asarray(class_allowed[t], bool)
        if p is not None:
            mask &= np.asarray(prediction) == p
        if not mask.any():
            continue
        for size, box, label_id, labelled in _components(mask, min_component_voxels):
            region = (size, t, p, (box, label_id, labelled))
            if seeding or confirming:
                queues.setdefault((t, "seed" if seeding else "right"), []).append(region)
                continue
            if t in classes:
                queues.setdefault((t, "missed"), []).append(region)
            if p in classes:
                queues.setdefault((p, "false"), []).append(region)
    for queue in queues.values():
        queue.sort(key=lambda r: -r[0])

    def kinds_of(k: int) -> List[str]:
        """The class's queues, the one with the largest region first (then they alternate)."""
        if seeding or confirming:
            return ["seed" if seeding else "right"]
        present = [kind for kind in ("missed", "false") if queues.get((k, kind))]
        return sorted(present, key=lambda kind: -queues[(k, kind)][0][0])

    if seeding:
        order = list(classes)
    else:  # worst Dice first; classes absent from both truth and prediction have no errors anyway
        scores = {k: _class_dice(truth, prediction, k) for k in classes}
        order = sorted(classes, key=lambda k: (np.nan_to_num(scores[k], nan=2.0), k))
    turn = {k: kinds_of(k) for k in order}  # per class, the queue to serve next comes first
    attempts = 0
    while len(strokes) < count and attempts < 20 * count + 20:
        progressed = False
        for k in order:
            if len(strokes) >= count:
                break
            painted_one = False
            for kind in list(turn[k]):
                queue = queues.get((k, kind), [])
                while queue:
                    size, t, p, (box, label_id, labelled) = queue[0]
                    attempts += 1
                    margin = int(np.ceil(spread_mm / spacing_zyx.min())) + 2
                    lo = np.array([max(0, s.start - margin) for s in box])
                    hi = np.array([min(n, s.stop + margin) for s, n in zip(box, truth.shape)])
                    window = tuple(slice(a, b) for a, b in zip(lo, hi))
                    component = (labelled[window] == label_id) & ~painted[window]
                    same_code = painted_code[window] == t + 1
                    near = (ndimage.distance_transform_edt(~same_code, sampling=spacing_zyx) < spread_mm
                            if same_code.any() else None)
                    stroke = _stroke_in_component(component, lo, spacing_zyx, near, rng, length_mm, radius_voxels)
                    if stroke is None:  # region used up: drop it from every queue
                        for key in queues:
                            queues[key] = [r for r in queues[key] if r[1:3] != (t, p) or r[3][1] != label_id]
                        queue = queues.get((k, kind), [])
                        continue
                    voxels, plane, centre, length = stroke
                    index = tuple(voxels.T)
                    codes[index] = t + 1
                    painted[index] = True
                    painted_code[index] = t + 1
                    strokes.append(Stroke(t + 1, t, p, plane, centre, round(length, 2), len(voxels), size))
                    # the next stroke from this queue goes to its next-largest region; regions are
                    # revisited (at least spread_mm from earlier strokes) only when every region has one
                    queue.append(queue.pop(0))
                    painted_one = True
                    break
                if painted_one:
                    turn[k] = turn[k][1:] + turn[k][:1]  # alternate missed / false for this class
                    break
            progressed = progressed or painted_one
        if not progressed:
            break
    return codes, strokes


def seed_strokes(truth: np.ndarray, spacing_xyz: Sequence[float], per_class: int, rng: np.random.Generator,
                 allowed: Optional[np.ndarray] = None, **options) -> Tuple[np.ndarray, List[Stroke]]:
    """``per_class`` seed strokes for each class present (background, bone, lesion) on an unlabelled image."""
    present = [k for k in (0, 1, 2) if (np.asarray(truth) == k).any()]
    return paint_strokes(truth, None, spacing_xyz, per_class * len(present), rng, allowed=allowed,
                         classes=present, **options)


def codes_image(codes: np.ndarray, reference):
    """A stroke-code array as a uint8 SimpleITK image on ``reference``'s grid (for ``refine``)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(codes, dtype=np.uint8))
    image.CopyInformation(reference)
    return image
