"""MRML adapter: Slicer volume and segmentation nodes <-> the engine's SimpleITK images.

Runs unchanged inside 3D Slicer and under the PyPI package ``slicer-core`` (real MRML, no Qt); it never
imports ``qt``, ``ctk`` or ``slicer.app`` and takes the scene and nodes as arguments.

Geometry. SimpleITK images live in LPS physical space: ``p_LPS = origin + D @ diag(spacing) @ ijk``.
Slicer volume nodes live in RAS: ``p_RAS = IJKToRAS @ ijk``. With ``F = diag(-1, -1, 1)``:
``IJKToRAS = [[F @ D @ diag(spacing), F @ origin], [0, 0, 0, 1]]``. Spacing, origin and direction are
copied component-wise (only signs flip), so a round trip is exact. A volume under a *linear* parent
transform is read in world coordinates (the transform is applied); a non-linear one is refused.

Segments written by this module carry the tag :data:`CLASS_TAG` (``"bone"`` / ``"lesion"``). Only
segments with that tag are ever replaced; the user's own segments are never touched, not even a segment
the user named "Bone": ours is then called "Bone (FCMSegmentation)" and the user's stays as it was.

Scribbles: a separate segmentation with segments Background / Bone / Lesion (tag :data:`SCRIBBLE_TAG`,
or found by name) is read back as a code map 0 unpainted, 1 background, 2 bone, 3 lesion. Where strokes
overlap, the more specific class wins: lesion > bone > background.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .affine import rigid_matrix
from .errors import InputError
from .imageio import SEGMENT_COLORS, SEGMENT_NAMES
from .preprocessing import CLASS_NAMES, voxel_volume_ml

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CLASS_TAG = "FCMSegmentation.Class"
SCRIBBLE_TAG = "FCMSegmentation.Scribble"
MEMBERSHIP_ATTRIBUTE = "FCMSegmentation.Membership"
NAME_SUFFIX_ON_CLASH = " (FCMSegmentation)"

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
#: Slicer terminology entries (``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` format).
TERMINOLOGY = {
    "bone": f"{TERMINOLOGY_CONTEXT}~SCT^123037004^Anatomical Structure~SCT^272673000^Bone~^^"
            f"~{ANATOMIC_CONTEXT}~^^~^^",
    "lesion": f"{TERMINOLOGY_CONTEXT}~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^"
              f"~{ANATOMIC_CONTEXT}~^^~^^",
}
#: Result classes written as segments: label value -> (class key, default name, colour).
RESULT_CLASSES = {
    1: ("bone", SEGMENT_NAMES[0], SEGMENT_COLORS[0]),
    2: ("lesion", SEGMENT_NAMES[1], SEGMENT_COLORS[1]),
}
#: Scribble segments: (class key, name, colour, stroke code), in increasing precedence.
SCRIBBLE_CLASSES = (
    ("background", "Background", (0.259, 0.557, 0.961), 1),
    ("bone", "Bone", (0.996, 0.851, 0.102), 2),
    ("lesion", "Lesion", (0.976, 0.169, 0.949), 3),
)

_CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


# --------------------------------------------------------------------------------------------- setup

def ensure_converter_rules() -> None:
    """Register the segmentation converter rules if none are (Slicer does it at startup; slicer-core not).

    Without rules a segmentation cannot even create an empty binary labelmap. A no-op inside Slicer.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) > 0:
        return
    for name in _CONVERTER_RULES:
        rule_class = getattr(slicer, name, None)
        if rule_class is not None:
            factory.RegisterConverterRule(rule_class())


# ------------------------------------------------------------------------------------------ geometry

def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_to_world(node: "slicer.vtkMRMLTransformableNode") -> Optional[np.ndarray]:
    """The 4x4 local-to-world matrix of ``node``'s parent transforms, or None when it has none.

    Raises :class:`InputError` for a non-linear (warping) transform.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return None
    if not transform.IsTransformToWorldLinear():
        raise InputError(
            f"{node.GetName()}: is under a non-linear transform; harden the transform "
            "(Data module, right-click > Harden transform) and try again"
        )
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return _matrix_to_numpy(matrix)


def _node_geometry_ras(node: "slicer.vtkMRMLVolumeNode") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin_RAS, direction_RAS 3x3) of a volume node in its own (local) coordinates."""
    directions = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(directions)
    direction = _matrix_to_numpy(directions)[:3, :3]
    return np.array(node.GetSpacing(), float), np.array(node.GetOrigin(), float), direction


def _world_geometry_lps(node: "slicer.vtkMRMLVolumeNode", extent_start: Sequence[int]):
    """(spacing, origin_LPS, direction_LPS) of a volume node in world coordinates, voxel 0 = extent start."""
    spacing, origin, direction = _node_geometry_ras(node)
    to_world = parent_to_world(node)
    if to_world is not None:
        ijk_to_world = to_world @ _ijk_to_ras(spacing, origin, direction)
        columns = ijk_to_world[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        direction = columns / spacing
        origin = ijk_to_world[:3, 3]
    if any(extent_start):
        origin = origin + direction @ (spacing * np.asarray(extent_start, float))
    return spacing, LPS_TO_RAS @ origin, LPS_TO_RAS @ direction


def _ijk_to_ras(spacing: np.ndarray, origin: np.ndarray, direction: np.ndarray) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = direction * spacing
    matrix[:3, 3] = origin
    return matrix


def image_ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix equivalent to a SimpleITK image's LPS geometry."""
    direction = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    return _ijk_to_ras(np.array(image.GetSpacing()), LPS_TO_RAS @ np.array(image.GetOrigin()), direction)


def _as_3d(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 2:
        return sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(f"{image.GetDimension()}-D image: only 2-D and 3-D images can be shown in Slicer")
    return image


# ------------------------------------------------------------------------------------------- volumes

def image_data_to_array(image_data: vtk.vtkImageData) -> np.ndarray:
    """A copy of vtkImageData scalars as a (z, y, x) or (z, y, x, c) array."""
    scalars = image_data.GetPointData().GetScalars()
    if scalars is None:
        raise InputError("volume has no voxel data; load or create the image first")
    nx, ny, nz = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(scalars).copy()
    components = scalars.GetNumberOfComponents()
    return array.reshape((nz, ny, nx, components) if components > 1 else (nz, ny, nx))


def volume_node_to_sitk(volume_node: "slicer.vtkMRMLVolumeNode") -> sitk.Image:
    """The volume (any pixel type; vector volumes give vector images) as a SimpleITK image in LPS.

    Geometry is exact; a linear parent transform is applied (world coordinates). Raises
    :class:`InputError` for a missing node, a node without voxels or a non-linear transform.
    """
    if volume_node is None:
        raise InputError("no volume selected; choose an input volume")
    image_data = volume_node.GetImageData()
    if image_data is None:
        raise InputError(f"{volume_node.GetName()}: volume has no voxel data; load the image first")
    array = image_data_to_array(image_data)
    extent = image_data.GetExtent()
    spacing, origin, direction = _world_geometry_lps(volume_node, (extent[0], extent[2], extent[4]))
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    return image


def _array_to_image_data(array: np.ndarray) -> vtk.vtkImageData:
    """(z, y, x[, c]) array -> vtkImageData (origin 0, spacing 1: geometry lives on the MRML node)."""
    if np.iscomplexobj(array):
        raise InputError("complex-valued images cannot be shown in Slicer; take the magnitude first")
    components = array.shape[3] if array.ndim == 4 else 1
    flat = np.ascontiguousarray(array).reshape(-1, components)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def set_node_geometry(volume_node: "slicer.vtkMRMLVolumeNode", image: sitk.Image) -> None:
    """Copy a SimpleITK image's geometry onto a volume node (LPS -> RAS, component-wise, exact)."""
    direction = LPS_TO_RAS @ np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction
    volume_node.SetIJKToRASDirectionMatrix(_numpy_to_matrix(matrix))
    volume_node.SetSpacing(*image.GetSpacing())
    volume_node.SetOrigin(*(LPS_TO_RAS @ np.array(image.GetOrigin())).tolist())


def sitk_to_volume_node(
    image: sitk.Image,
    scene: "slicer.vtkMRMLScene",
    name: str,
    node: Optional["slicer.vtkMRMLVolumeNode"] = None,
) -> "slicer.vtkMRMLVolumeNode":
    """Put a SimpleITK image (any pixel type, exact geometry) into ``node`` or a new volume node.

    A new node is a scalar volume (a vector volume for multi-component images) named ``name``, with
    default display nodes. An existing ``node`` keeps its name and parent transform (which then applies
    on top of the image's geometry).
    """
    image = _as_3d(image)
    array = sitk.GetArrayFromImage(image)
    if node is None:
        class_name = "vtkMRMLVectorVolumeNode" if array.ndim == 4 else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(class_name, name)
        node.CreateDefaultDisplayNodes()
    set_node_geometry(node, image)
    node.SetAndObserveImageData(_array_to_image_data(array))
    return node


def membership_volumes(
    result, scene: "slicer.vtkMRMLScene", prefix: str = "FCM membership"
) -> List["slicer.vtkMRMLScalarVolumeNode"]:
    """One float volume per class ("<prefix> background/bone/lesion") from ``result.memberships``.

    Volumes made by an earlier call with the same prefix (attribute :data:`MEMBERSHIP_ATTRIBUTE`) are
    updated in place rather than duplicated.
    """
    memberships = result.memberships
    nodes = []
    for k in range(memberships.GetNumberOfComponentsPerPixel()):
        class_name = CLASS_NAMES[k] if k < len(CLASS_NAMES) else f"class {k}"
        name = f"{prefix} {class_name}"
        channel = sitk.VectorIndexSelectionCast(memberships, k, sitk.sitkFloat32)
        node = sitk_to_volume_node(channel, scene, name, _find_membership_node(scene, name))
        node.SetAttribute(MEMBERSHIP_ATTRIBUTE, class_name)
        nodes.append(node)
    return nodes


def _find_membership_node(scene: "slicer.vtkMRMLScene", name: str) -> Optional["slicer.vtkMRMLVolumeNode"]:
    nodes = scene.GetNodesByClassByName("vtkMRMLScalarVolumeNode", name)
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(MEMBERSHIP_ATTRIBUTE):
            return node
    return None


# ------------------------------------------------------------------------------------------ segments

def segment_tag(segment: "slicer.vtkSegment", tag: str) -> Optional[str]:
    """The value of a segment tag, or None when the segment does not have it."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def _segments(segmentation: "slicer.vtkSegmentation") -> List[Tuple[str, "slicer.vtkSegment"]]:
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [(segment_id, segmentation.GetSegment(segment_id)) for segment_id in ids]


def find_tagged_segment(segmentation: "slicer.vtkSegmentation", tag: str, value: str) -> Optional[str]:
    """ID of the first segment whose ``tag`` equals ``value``, or None."""
    for segment_id, segment in _segments(segmentation):
        if segment_tag(segment, tag) == value:
            return segment_id
    return None


def _free_name(segmentation: "slicer.vtkSegmentation", name: str) -> str:
    """``name``, or ``name + NAME_SUFFIX_ON_CLASH`` when a segment not made by us already uses it."""
    clash = any(
        segment.GetName() == name and segment_tag(segment, CLASS_TAG) is None
        for _, segment in _segments(segmentation)
    )
    return name + NAME_SUFFIX_ON_CLASH if clash else name


def _add_result_segment(segmentation: "slicer.vtkSegmentation", key: str, name: str, color) -> str:
    """Create our (empty) segment for class ``key`` with name, colour, terminology and class tag."""
    segment_id = segmentation.GenerateUniqueSegmentID(f"FCMSegmentation_{key}")
    segment_id = segmentation.AddEmptySegment(segment_id, _free_name(segmentation, name), list(color))
    segment = segmentation.GetSegment(segment_id)
    segment.SetTag(segment.GetTerminologyEntryTagName(), TERMINOLOGY[key])
    segment.SetTag(CLASS_TAG, key)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    return segment_id


def oriented_mask(mask: np.ndarray, ijk_to_world: np.ndarray) -> "slicer.vtkOrientedImageData":
    """A uint8 (z, y, x) mask as vtkOrientedImageData with the given IJK-to-RAS matrix."""
    oriented = slicer.vtkOrientedImageData()
    oriented.ShallowCopy(_array_to_image_data(mask.astype(np.uint8)))
    oriented.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_world))
    return oriented


def _labels_to_segmentation_space(labels: sitk.Image, segmentation_node) -> np.ndarray:
    """IJK-to-(segmentation node's local RAS) matrix for ``labels`` (world coordinates)."""
    matrix = image_ijk_to_ras(labels)
    to_world = parent_to_world(segmentation_node)
    return matrix if to_world is None else np.linalg.inv(to_world) @ matrix


def write_result_segments(
    scene: "slicer.vtkMRMLScene",
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    labels: sitk.Image,
    source_volume_node: Optional["slicer.vtkMRMLScalarVolumeNode"] = None,
) -> Dict[str, str]:
    """Write label map 1 (bone) / 2 (lesion) as our segments; returns {"bone": id, "lesion": id}.

    ``labels`` is in world LPS (as the engine returns it). Our segments (tag :data:`CLASS_TAG`) are
    replaced, or created with name, colour and SNOMED CT terminology; every other segment is left alone
    (overlaps go to a separate labelmap layer). The reference geometry and the source-volume reference
    come from ``source_volume_node`` (when given), and the node goes under that volume's study in the
    subject hierarchy.
    """
    ensure_converter_rules()
    labels = _as_3d(labels)
    if source_volume_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(source_volume_node)
        place_in_study(scene, segmentation_node, source_volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    array = sitk.GetArrayViewFromImage(labels)
    ijk_to_local = _labels_to_segmentation_space(labels, segmentation_node)
    segmentation = segmentation_node.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    ids = {}
    for value, (key, name, color) in RESULT_CLASSES.items():
        segment_id = find_tagged_segment(segmentation, CLASS_TAG, key)
        if segment_id is None:
            segment_id = _add_result_segment(segmentation, key, name, color)
        mask = oriented_mask(array == value, ijk_to_local)
        if not logic.SetBinaryLabelmapToSegment(mask, segmentation_node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"could not write segment {segment_id!r} into {segmentation_node.GetName()}")
        ids[key] = segment_id
    return ids


def place_in_study(scene: "slicer.vtkMRMLScene", node: "slicer.vtkMRMLNode", source_node: "slicer.vtkMRMLNode") -> bool:
    """Put ``node`` under ``source_node``'s study in the subject hierarchy; True if it was placed.

    Only a node that is not yet in the hierarchy or sits at scene level is moved (a place the user
    chose is kept). Does nothing when there is no hierarchy or the source is not under a study.
    """
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return False
    source_item = hierarchy.GetItemByDataNode(source_node)
    if not source_item:
        return False
    study = hierarchy.GetItemParent(source_item)
    study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    if not study or hierarchy.GetItemLevel(study) != study_level:
        return False
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        hierarchy.CreateItem(study, node)
        return True
    if hierarchy.GetItemParent(item) in (0, hierarchy.GetSceneItemID()):
        hierarchy.SetItemParent(item, study)
        return True
    return hierarchy.GetItemParent(item) == study


# ----------------------------------------------------------------------------------------- scribbles

def create_scribble_segmentation(
    scene: "slicer.vtkMRMLScene",
    reference_volume_node: "slicer.vtkMRMLScalarVolumeNode",
    name: str = "FCM scribbles",
) -> "slicer.vtkMRMLSegmentationNode":
    """A new segmentation on the reference volume's grid with empty Background / Bone / Lesion segments.

    Each segment carries tag :data:`SCRIBBLE_TAG` = its class key; colours are distinct from the result's.
    """
    ensure_converter_rules()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    node.SetAttribute(SCRIBBLE_TAG, "1")
    segmentation = node.GetSegmentation()
    for key, segment_name, color, _ in SCRIBBLE_CLASSES:
        segment_id = segmentation.AddEmptySegment(f"scribble_{key}", segment_name, list(color))
        segment = segmentation.GetSegment(segment_id)
        segment.SetTag(SCRIBBLE_TAG, key)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
    place_in_study(scene, node, reference_volume_node)
    return node


def scribble_segment_ids(segmentation: "slicer.vtkSegmentation") -> Dict[str, str]:
    """{class key: segment ID} of the stroke segments, by :data:`SCRIBBLE_TAG`, else by name."""
    found: Dict[str, str] = {}
    for key, segment_name, _, _ in SCRIBBLE_CLASSES:
        segment_id = find_tagged_segment(segmentation, SCRIBBLE_TAG, key)
        if segment_id is None:
            segment_id = next(
                (sid for sid, seg in _segments(segmentation) if seg.GetName().strip().lower() == segment_name.lower()),
                None,
            )
        if segment_id is not None:
            found[key] = segment_id
    return found


def _export_segment_mask(segmentation_node, segment_id: str, reference: sitk.Image, reference_node) -> np.ndarray:
    """One segment as a bool (z, y, x) mask on ``reference``'s grid."""
    scene = segmentation_node.GetScene()
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__fcm_scribble_export")
    labelmap_node.SetHideFromEditors(True)
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap_node, reference_node
        )
        if not exported or labelmap_node.GetImageData() is None:
            return np.zeros(reference.GetSize()[::-1], bool)
        mask = volume_node_to_sitk(labelmap_node) != 0
        on_grid = sitk.Resample(
            mask, reference.GetSize(), sitk.Transform(), sitk.sitkNearestNeighbor, reference.GetOrigin(),
            reference.GetSpacing(), reference.GetDirection(), 0, sitk.sitkUInt8,
        )
        return sitk.GetArrayFromImage(on_grid).astype(bool)
    finally:
        scene.RemoveNode(labelmap_node)


def read_scribbles(
    scribble_segmentation_node: "slicer.vtkMRMLSegmentationNode",
    reference_volume_node: "slicer.vtkMRMLScalarVolumeNode",
) -> sitk.Image:
    """Strokes as a uint8 code map (0 unpainted, 1 background, 2 bone, 3 lesion) on the reference grid.

    Overlaps resolve lesion > bone > background. Raises :class:`InputError` when the segmentation has
    none of the Background / Bone / Lesion segments.
    """
    ensure_converter_rules()
    reference = volume_node_to_sitk(reference_volume_node)
    ids = scribble_segment_ids(scribble_segmentation_node.GetSegmentation())
    if not ids:
        raise InputError(
            f"{scribble_segmentation_node.GetName()}: has no Background, Bone or Lesion segment to read "
            "strokes from; create the scribbles segmentation with the module first"
        )
    codes = np.zeros(reference.GetSize()[::-1], np.uint8)
    for key, _, _, code in SCRIBBLE_CLASSES:  # increasing precedence: later classes overwrite
        if key in ids:
            codes[_export_segment_mask(scribble_segmentation_node, ids[key], reference, reference_volume_node)] = code
    image = sitk.GetImageFromArray(codes)
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


# ---------------------------------------------------------------------------------------- statistics

def segment_statistics(labels: sitk.Image) -> Dict[str, Optional[float]]:
    """Volumes of bone (label 1) and lesion (label 2) in mL and lesion volume / bone volume.

    Keys: ``bone_ml``, ``lesion_ml``, ``lesion_bone_fraction`` (None when there is no bone).
    """
    voxel_ml = voxel_volume_ml(labels)
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel().astype(np.int64), minlength=3)
    bone_ml, lesion_ml = counts[1] * voxel_ml, counts[2] * voxel_ml
    fraction = lesion_ml / bone_ml if bone_ml > 0 else None
    return {"bone_ml": float(bone_ml), "lesion_ml": float(lesion_ml), "lesion_bone_fraction": fraction}


def format_statistics(stats: Dict[str, Optional[float]]) -> str:
    """One line such as ``Bone 1234.5 mL · Lesion 12.3 mL · lesion/bone 1.0%``."""
    fraction = stats.get("lesion_bone_fraction")
    ratio = "n/a" if fraction is None else f"{100.0 * fraction:.1f}%"
    return f"Bone {stats['bone_ml']:.1f} mL · Lesion {stats['lesion_ml']:.1f} mL · lesion/bone {ratio}"


# ---------------------------------------------------------------------------------------- alignment

ALIGNMENT_NODE_NAME = "FCM SPECT alignment"


def rigid_to_ras(transform: sitk.Euler3DTransform) -> np.ndarray:
    """The 4x4 RAS matrix of a rigid LPS transform (as a transform to parent: local point -> world)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ rigid_matrix(transform) @ flip


def write_alignment(scene: "slicer.vtkMRMLScene", alignment, spect_node: "slicer.vtkMRMLVolumeNode",
                    name: str = ALIGNMENT_NODE_NAME) -> Optional["slicer.vtkMRMLLinearTransformNode"]:
    """Record a Segment's SPECT/CT alignment (:class:`alignment.Alignment`) in the linear transform node
    ``name`` (created when first needed): placing ``spect_node`` under it shows the SPECT where segmenting
    used it. If the SPECT was already under that node, segmenting saw it moved, so the new correction is
    composed with the node's; otherwise the node holds the correction alone (identity when nothing was
    moved, so an earlier study's correction is never left behind). None when there is no node to show."""
    node = scene.GetFirstNodeByName(name)
    node = node if node is not None and node.IsA("vtkMRMLLinearTransformNode") else None
    applied = alignment is not None and alignment.applied
    if node is None and not applied:
        return None
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    observed = spect_node is not None and spect_node.GetTransformNodeID() == node.GetID()
    before = vtk.vtkMatrix4x4()
    node.GetMatrixTransformToParent(before)
    base = _matrix_to_numpy(before) if observed else np.eye(4)
    step = rigid_to_ras(alignment.transform) if applied else np.eye(4)
    node.SetMatrixTransformToParent(_numpy_to_matrix(step @ base))
    return node


# ---------------------------------------------------------------------------------------- everything

@dataclass
class AppliedResult:
    """What :func:`write_result` put into the scene.

    segment_ids: {"bone": id, "lesion": id}. membership_nodes: the per-class volumes (empty unless asked).
    statistics: :func:`segment_statistics`. text: :func:`format_statistics` of it (one line).
    """

    segment_ids: Dict[str, str]
    membership_nodes: List["slicer.vtkMRMLScalarVolumeNode"] = field(default_factory=list)
    statistics: Dict[str, Optional[float]] = field(default_factory=dict)
    text: str = ""


def write_result(
    scene: "slicer.vtkMRMLScene",
    result,
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    source_volume_node: Optional["slicer.vtkMRMLScalarVolumeNode"] = None,
    show_memberships: bool = False,
    membership_prefix: str = "FCM membership",
) -> AppliedResult:
    """Put an engine ``SegmentationResult`` into the scene (main thread) and say what was made.

    Writes our Bone/Lesion segments (see :func:`write_result_segments`) and, if ``show_memberships`` or
    if membership volumes of an earlier run exist, one membership volume per class (see
    :func:`membership_volumes`).
    """
    ids = write_result_segments(scene, segmentation_node, result.labels, source_volume_node)
    # Membership volumes from an earlier run are updated even when not asked for: never stale.
    refresh = show_memberships or _find_membership_node(scene, f"{membership_prefix} {CLASS_NAMES[0]}") is not None
    nodes = membership_volumes(result, scene, membership_prefix) if refresh else []
    stats = segment_statistics(result.labels)
    return AppliedResult(ids, nodes, stats, format_statistics(stats))

