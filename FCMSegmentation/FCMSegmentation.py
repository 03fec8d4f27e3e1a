"""FCM Segmentation: bone and bone-lesion segmentation of SPECT/CT with a fuzzy-C-means-trained U-Net.

Layers: this file is the thin Slicer front end (Widget, parameter node, Logic, self-test). The engine
(``FCMSegmentationLib``, Qt-free) does the computation; ``FCMSegmentationLib.mrml`` converts between
MRML nodes and SimpleITK images. Nothing heavy (torch, the engine's compute modules) is imported when
Slicer loads this module: every engine import happens inside a method, at first use.

Threading: every torch computation runs on ONE persistent worker thread (``FCMSegmentationLib.worker``).
The main thread converts MRML nodes to SimpleITK images, submits a job, and polls the job with a ``qt.QTimer``
for progress and completion; results are written to MRML on the main thread. Worker code never touches
Qt or MRML. Cancel sets the job's ``threading.Event``, which the engine checks between units of work.
"""
import inspect
import logging
import os
from typing import TYPE_CHECKING, Annotated, Any, Callable, List, Optional, Tuple

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:  # the engine is imported at first use, after torch is checked
    from FCMSegmentationLib.worker import Job

DEVICE_CHOICES = ["auto", "cuda", "mps", "cpu"]
DEFAULT_STEPS = 30  # = RefineSettings.steps (the engine is imported only at first use)
DEFAULT_ALPHA = 1.0
DEFAULT_BETA = 0.0008
DEFAULT_PATCH = 96
TORCH_REQUIREMENT = ">=2.2"
SCRIBBLE_EDITOR_SINGLETON_TAG = "FCMSegmentationScribbles"
SAMPLE_CATEGORY = "FCMSegmentation"
SAMPLE_NAME = "FCMSyntheticSPECTCT"
SAMPLE_SEED = 7


#
# FCMSegmentation
#


class FCMSegmentation(ScriptedLoadableModule):
    """Module metadata; see https://github.com/fcmsegmentation/FCMSegmentation."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("FCM Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # the PyTorch extension is checked at first use, not at load
        self.parent.contributors = ["FCMSegmentation developers (https://github.com/fcmsegmentation/FCMSegmentation)"]
        self.parent.helpText = _("""
Segments <b>bone</b> and <b>bone lesions</b> in SPECT (optionally with CT) with a U-Net trained with
the robust fuzzy C-means loss, after moving the SPECT back onto the CT where the patient moved between
the scans, shows the soft memberships, and lets you correct the result: paint a few
strokes (Background, Bone, Lesion) and press <b>Refine</b> to fine-tune the network on this image in a
few seconds. <b>Adapt without labels</b> fine-tunes on the image alone (new scanner or reconstruction).
Work runs in the background; Cancel stops it without changing anything.
<br><br>
Method: J. Chen et al., "Learning Fuzzy Clustering for SPECT/CT Segmentation via Convolutional Neural
Networks", Medical Physics 48(7), 2021 (<a href="https://arxiv.org/abs/2104.08623">arXiv:2104.08623</a>);
J. Chen and E. C. Frey, "Medical Image Segmentation via Unsupervised Convolutional Neural Network",
MIDL 2020 (<a href="https://arxiv.org/abs/2001.10155">arXiv:2001.10155</a>).
<br>
Not for clinical use. See the
<a href="https://github.com/fcmsegmentation/FCMSegmentation">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
This extension is an independent implementation of the learned fuzzy clustering method of Junyu Chen,
Eric C. Frey and colleagues (Johns Hopkins University), who published the loss functions. It uses
3D Slicer, PyTorch (through the SlicerPyTorch extension), SimpleITK and NumPy.
""")
        # Register the synthetic sample data set once the application has started.
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a small synthetic SPECT/CT case, generated locally on first use (nothing is downloaded)
#


def registerSampleData():
    """Add the synthetic SPECT/CT case to the Sample Data module."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName=SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "FCMSegmentation.png"),
        # Placeholders: SampleDataSource needs one uri/file name; customDownloader generates the data.
        uris="fcmsegmentation://synthetic/%d" % SAMPLE_SEED,
        fileNames=SAMPLE_NAME + ".nrrd",
        nodeNames="FCM synthetic SPECT",
        customDownloader=loadSyntheticSample,
    )


def syntheticSampleFolder() -> str:
    """Cache folder for the generated sample (written once, reused afterwards)."""
    return os.path.join(slicer.app.cachePath, "FCMSegmentation", "SyntheticSPECTCT-%d" % SAMPLE_SEED)


def loadSyntheticSample(*args) -> list:
    """SampleData custom downloader: generate (once) and load the synthetic SPECT and CT volumes.

    SampleData calls this with the source as argument (older Slicer: without), hence ``*args``.
    Returns the loaded nodes [SPECT, CT].
    """
    folder = syntheticSampleFolder()
    spectPath = os.path.join(folder, "spect.nrrd")
    ctPath = os.path.join(folder, "ct.nrrd")
    if not (os.path.isfile(spectPath) and os.path.isfile(ctPath)):
        with slicer.util.tryWithErrorDisplay(_("Could not generate the synthetic SPECT/CT case."), waitCursor=True):
            FCMSegmentationLogic().ensureDependencies()
            import SimpleITK as sitk

            from FCMSegmentationLib import phantoms

            case = phantoms.procedural_phantom(SAMPLE_SEED)
            os.makedirs(folder, exist_ok=True)
            sitk.WriteImage(case.spect, spectPath, True)
            sitk.WriteImage(case.ct, ctPath, True)
    spectNode = slicer.util.loadVolume(spectPath, {"name": "FCM synthetic SPECT"})
    ctNode = slicer.util.loadVolume(ctPath, {"name": "FCM synthetic CT", "show": False})
    # Select both inputs, so a new user segments SPECT+CT without picking the (hidden) CT by hand.
    parameterNode = FCMSegmentationLogic().getParameterNode()
    parameterNode.spectVolume = spectNode
    parameterNode.ctVolume = ctNode
    return [spectNode, ctNode]


#
# FCMSegmentationParameterNode
#


@parameterNodeWrapper
class FCMSegmentationParameterNode:
    """All GUI state of the module, saved with the scene.

    spectVolume: SPECT to segment. ctVolume: optional CT (the result is on its grid when given).
    outputSegmentation: receives the Bone and Lesion segments (created when empty).
    scribbleSegmentation: the user's strokes (Background/Bone/Lesion), separate from the result.
    modelPath: model file; empty means the shipped default model.
    device: auto, cuda, mps or cpu. steps, alpha, beta: fine-tuning settings for Refine and Adapt.
    patchSize: sliding-window patch edge in voxels. showMemberships: also create membership volumes.
    alignSpect: first undo a rigid SPECT/CT misregistration (patient motion between the scans).
    dropFaintLesions: with a CT, leave out predicted lesions under 0.5 ml that are never clearly lesion.
    """

    spectVolume: vtkMRMLScalarVolumeNode
    ctVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    scribbleSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    steps: Annotated[int, WithinRange(1, 1000)] = DEFAULT_STEPS
    alpha: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULT_ALPHA
    beta: Annotated[float, WithinRange(0.0, 0.1)] = DEFAULT_BETA
    patchSize: Annotated[int, WithinRange(32, 256)] = DEFAULT_PATCH
    showMemberships: bool = False
    alignSpect: bool = True
    dropFaintLesions: bool = False


#
# Worker thread and jobs (no Qt, no MRML in here)
#


class FCMTask:
    """A submitted job plus what to do with its result on the main thread (``apply(result) -> str``)."""

    def __init__(self, job: "Job", apply: Callable[[Any], str], generation: int):
        self.job = job
        self.apply = apply
        self.generation = generation

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def done(self) -> bool:
        return self.job.doneEvent.is_set()

    def progress(self) -> Tuple[float, str]:
        return self.job.progress()

    def cancel(self) -> None:
        self.job.cancelEvent.set()


def _newSession(spect, ct, modelPath: str, randomWeights: bool, device: str, patchSize: int, alignSpect: bool,
                dropFaintLesions: bool, progress, cancel):
    """Worker thread: a RefinementSession on the given images with the chosen model."""
    from FCMSegmentationLib.refinement import RefinementSession

    model: Any = None  # None: the shipped default model
    if randomWeights:
        from FCMSegmentationLib.modelfile import random_model

        model = random_model("cpu")
    elif modelPath:
        model = modelPath
    return RefinementSession(spect, ct, model=model, device=device, patch=int(patchSize), align=bool(alignSpect),
                             drop_faint_lesions=bool(dropFaintLesions), progress=progress, cancel=cancel)


class FCMSegmentationDependencyError(RuntimeError):
    """A required package or extension is missing; the message says how to get it."""


#
# FCMSegmentationLogic
#


class FCMSegmentationLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from the Python console without the widget.

    Synchronous methods (``segment``, ``refine``, ``adapt``, ``undo``, ``resetModel``, ``saveModel``)
    run the work on the worker thread and wait for it; each returns the statistics/summary line. The
    ``start*`` variants return an :class:`FCMTask` at once; :meth:`finish` applies its result to MRML
    (main thread). Example::

        import FCMSegmentation
        logic = FCMSegmentation.FCMSegmentationLogic()
        spect = slicer.util.getNode("FCM synthetic SPECT")
        print(logic.segment(spect))
        strokes = logic.createScribbleSegmentation(spect)   # paint, then:
        print(logic.refine(strokes, steps=20))
        print(logic.undo())
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesReady = False
        self._torchDeclined = False
        self._session = None
        self._outputNode = None
        self._referenceNode = None
        self._showMemberships = False
        self._activeTask: Optional[FCMTask] = None
        self._generation = 0
        self.lastResult = None
        self.lastSummary = ""
        self.lastDevice = ""
        self.canUndo = False

    def getParameterNode(self) -> FCMSegmentationParameterNode:
        return FCMSegmentationParameterNode(super().getParameterNode())

    # ---- state -------------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._activeTask is not None and not self._activeTask.done

    @property
    def hasSession(self) -> bool:
        return self._session is not None

    @property
    def lesionCore(self) -> Optional[float]:
        """The fraction of each lesion's peak membership that the current result keeps as lesion (the model's
        calibrated lesion core unless changed with :meth:`startSetLesionCore`); None before Segment."""
        return None if self._session is None else self._session.lesion_core

    @property
    def dropFaintLesions(self) -> Optional[bool]:
        """Whether the current result leaves out small faint lesions (:meth:`startSetDropFaintLesions`);
        None before Segment."""
        return None if self._session is None else self._session.drop_faint_lesions

    @property
    def referenceNode(self):
        """The volume whose grid the current result is on (CT if given, else SPECT)."""
        return self._referenceNode

    def forgetSession(self) -> None:
        """Drop the session and node references (scene closed); results of running jobs are discarded."""
        self.cancel()
        self._generation += 1
        self._session = None
        self._outputNode = None
        self._referenceNode = None
        self.lastResult = None
        self.canUndo = False

    # ---- dependencies ------------------------------------------------------------------------

    def ensureDependencies(self) -> None:
        """Make torch (via the PyTorch extension) and Resources/requirements.txt available.

        Called at first use, never at import. Asks before installing; raises
        :class:`FCMSegmentationDependencyError` with what to do if something is missing.
        """
        if self._dependenciesReady:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise FCMSegmentationDependencyError(_(
                "FCM Segmentation needs the PyTorch extension. Install 'PyTorch' from the Extensions Manager, "
                "restart Slicer, then try again.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if self._torchDeclined:
                raise FCMSegmentationDependencyError(_(
                    "PyTorch is not installed. Press the button again to install it, or install it from the "
                    "PyTorch Utils module."))
            torch = torchLogic.installTorch(askConfirmation=not slicer.app.testingEnabled(),
                                            torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                self._torchDeclined = True
                raise FCMSegmentationDependencyError(_(
                    "PyTorch installation was cancelled. FCM Segmentation cannot run without it."))
            self._torchDeclined = False
        self._ensureRequirements()
        self._dependenciesReady = True

    def _ensureRequirements(self) -> None:
        """Install missing packages of Resources/requirements.txt (never numpy, SimpleITK, vtk or torch)."""
        path = self.resourcePath("requirements.txt")
        protected = ["numpy", "SimpleITK", "vtk", "torch"]
        deps = None
        try:
            import slicer.pydeps as deps  # Slicer >= 5.11
        except ImportError:
            packaging = getattr(slicer, "packaging", None)
            if packaging is not None and hasattr(packaging, "pip_ensure") and hasattr(packaging, "load_requirements"):
                deps = packaging
        if deps is not None:
            requirements = deps.load_requirements(path)
            kwargs = {"requester": "FCMSegmentation"}
            if "skip_packages" in inspect.signature(deps.pip_ensure).parameters:
                kwargs["skip_packages"] = protected
            deps.pip_ensure(requirements, **kwargs)
            return
        missing = [line for line in _requirementLines(path) if not _requirementSatisfied(line)]
        if not missing:
            return
        if not slicer.app.testingEnabled() and not slicer.util.confirmOkCancelDisplay(
                _("FCM Segmentation needs these Python packages: {packages}. Install them now?").format(
                    packages=", ".join(missing))):
            raise FCMSegmentationDependencyError(_("Required Python packages are missing: {packages}.").format(
                packages=", ".join(missing)))
        for line in missing:
            slicer.util.pip_install(line)

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", relativePath)

    # ---- task plumbing -----------------------------------------------------------------------

    def _submit(self, name: str, work, apply: Callable[[Any], str], exclusive: bool = True) -> FCMTask:
        from FCMSegmentationLib.worker import Job, shared_worker

        task = FCMTask(Job(name, work), apply, self._generation)
        if exclusive:
            self._activeTask = task
        shared_worker().submit(task.job)
        return task

    def _checkIdle(self) -> None:
        if self.busy:
            raise self._userError(_("Another computation is running: wait for it or press Cancel."))

    def _requireSession(self) -> None:
        if self._session is None:
            raise self._userError(_("Press Segment first: refinement fine-tunes the network that produced "
                                    "the current segmentation."))

    @staticmethod
    def _userError(message: str) -> Exception:
        from FCMSegmentationLib.errors import InputError

        return InputError(message)

    @staticmethod
    def _mrml():
        from FCMSegmentationLib import mrml

        return mrml

    def cancel(self) -> None:
        """Ask the running job to stop (the engine stops at its next check; nothing is changed)."""
        if self._activeTask is not None and not self._activeTask.done:
            self._activeTask.cancel()

    def finish(self, task: FCMTask) -> str:
        """Main thread: apply a finished task's result to MRML and return its summary; raise its error."""
        if not task.done:
            raise RuntimeError("task is still running")
        if self._activeTask is task:
            self._activeTask = None
        if task.job.error is not None:
            raise task.job.error
        if task.generation != self._generation:
            return ""  # the scene was closed meanwhile: drop the result
        return task.apply(task.job.result)

    def wait(self, task: FCMTask, progress: Optional[Callable[[float, str], None]] = None) -> str:
        """Block until ``task`` is done (polling every 0.1 s, calling ``progress``), then :meth:`finish` it."""
        while not task.job.doneEvent.wait(0.1):
            if progress is not None:
                progress(*task.progress())
        return self.finish(task)

    def _applyResult(self, result) -> str:
        """Main thread: write a SegmentationResult into the output segmentation; return the summary."""
        summary = self._mrml().write_result(slicer.mrmlScene, result, self._outputNode, self._referenceNode,
                                            self._showMemberships).text
        self.lastResult = result
        self.lastDevice = result.device
        self.canUndo = bool(getattr(self._session, "can_undo", False))
        lines = [summary] + [note for note in result.notes if note]
        self.lastSummary = "\n".join(line for line in lines if line)
        return self.lastSummary

    # ---- helpers usable without the widget ------------------------------------------------------

    def createOutputSegmentation(self, spectNode) -> "vtkMRMLSegmentationNode":
        name = slicer.mrmlScene.GenerateUniqueName(_("{volume} FCM segmentation").format(volume=spectNode.GetName()))
        return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)

    def createScribbleSegmentation(self, referenceVolumeNode=None) -> "vtkMRMLSegmentationNode":
        """A new strokes segmentation (Background, Bone, Lesion) on the grid of the current result."""
        reference = referenceVolumeNode or self._referenceNode
        if reference is None:
            raise self._userError(_("Select a SPECT volume first."))
        return self._mrml().create_scribble_segmentation(slicer.mrmlScene, reference)

    def startDescribeDevice(self, device: str = "auto") -> FCMTask:
        """Which device ``device`` resolves to, in words (GPU name and memory, or a CPU warning)."""
        self.ensureDependencies()

        def work(progress, cancel):
            from FCMSegmentationLib.errors import FCMError
            from FCMSegmentationLib.inference import describe_device, resolve_device

            try:
                return describe_device(resolve_device(device))
            except FCMError as err:
                return str(err)

        return self._submit(_("Detecting device"), work, lambda text: text, exclusive=False)

    def defaultModelAvailable(self) -> bool:
        """Whether the shipped (or $FCMSEG_MODEL) default model exists."""
        self.ensureDependencies()

        def work(progress, cancel):
            from FCMSegmentationLib.errors import ModelError
            from FCMSegmentationLib.modelfile import default_model_path

            try:
                default_model_path()
                return True
            except ModelError:
                return False

        task = self._submit(_("Looking for the default model"), work, lambda found: found, exclusive=False)
        return self.wait(task)

    # ---- segment / refine / adapt / undo / reset / save -------------------------------------------

    def startSegment(self, spectNode, ctNode=None, outputSegmentationNode=None, modelPath: str = "",
                     device: str = "auto", patchSize: int = DEFAULT_PATCH, showMemberships: bool = False,
                     randomWeights: bool = False, alignSpect: bool = True, dropFaintLesions: bool = False
                     ) -> FCMTask:
        """Start segmenting ``spectNode`` (+ ``ctNode``) into ``outputSegmentationNode`` (created if None).

        ``randomWeights`` runs an untrained network (smoke tests only: the result is meaningless).
        ``alignSpect`` first undoes a rigid SPECT/CT misregistration (with a CT; the note says what moved).
        ``dropFaintLesions`` leaves out small faint lesions (with a CT; see :meth:`startSetDropFaintLesions`).
        """
        self._checkIdle()
        if spectNode is None:
            raise self._userError(_("Select a SPECT volume."))
        self.ensureDependencies()
        mrml = self._mrml()
        spect = mrml.volume_node_to_sitk(spectNode)
        ct = mrml.volume_node_to_sitk(ctNode) if ctNode is not None else None
        if outputSegmentationNode is None:
            outputSegmentationNode = self.createOutputSegmentation(spectNode)
        referenceNode = ctNode if ctNode is not None else spectNode

        def work(progress, cancel):
            session = _newSession(spect, ct, modelPath, randomWeights, device, patchSize, alignSpect,
                                  dropFaintLesions, progress, cancel)
            return session, session.segment()

        def apply(output):
            session, result = output
            self._session = session
            self._outputNode = outputSegmentationNode
            self._referenceNode = referenceNode
            self._showMemberships = bool(showMemberships)
            summary = self._applyResult(result)
            alignmentNode = self._mrml().write_alignment(slicer.mrmlScene, result.alignment, spectNode)
            if alignmentNode is not None and result.alignment.applied:
                summary += "\n" + _("Transform '{name}' holds that correction: put the SPECT under it (Data "
                                     "module) to see it where it was segmented.").format(name=alignmentNode.GetName())
                self.lastSummary = summary
            return summary

        return self._submit(_("Segmenting"), work, apply)

    def startRefine(self, scribbleSegmentationNode, steps: int = DEFAULT_STEPS, alpha: float = DEFAULT_ALPHA,
                    beta: float = DEFAULT_BETA, showMemberships: Optional[bool] = None) -> FCMTask:
        """Start fine-tuning on the strokes in ``scribbleSegmentationNode`` and re-segmenting."""
        self._checkIdle()
        self._requireSession()
        if scribbleSegmentationNode is None:
            raise self._userError(_("Create a strokes segmentation and paint some strokes first."))
        import SimpleITK as sitk

        scribbles = self._mrml().read_scribbles(scribbleSegmentationNode, self._referenceNode)
        if not sitk.GetArrayViewFromImage(scribbles).any():
            raise self._userError(_("No strokes painted yet: paint Background, Bone or Lesion strokes with "
                                    "the Paint effect, then press Refine."))
        if showMemberships is not None:
            self._showMemberships = bool(showMemberships)
        session = self._session

        def work(progress, cancel):
            return session.refine(scribbles, steps=int(steps), alpha=float(alpha), beta=float(beta),
                                  progress=progress, cancel=cancel)

        return self._submit(_("Refining"), work, self._applyResult)

    def startAdapt(self, steps: int = DEFAULT_STEPS, beta: float = DEFAULT_BETA,
                   showMemberships: Optional[bool] = None) -> FCMTask:
        """Start label-free fine-tuning on the current image (unsupervised loss only)."""
        self._checkIdle()
        self._requireSession()
        if showMemberships is not None:
            self._showMemberships = bool(showMemberships)
        session = self._session

        def work(progress, cancel):
            return session.adapt(steps=int(steps), beta=float(beta), progress=progress, cancel=cancel)

        return self._submit(_("Adapting"), work, self._applyResult)

    def startUndo(self) -> FCMTask:
        """Start undoing the last refinement/adaptation (weights and segmentation)."""
        self._checkIdle()
        self._requireSession()
        if not getattr(self._session, "can_undo", False):
            raise self._userError(_("Nothing to undo."))
        session = self._session
        return self._submit(_("Undoing"), lambda progress, cancel: session.undo(), self._applyResult)

    def startSetLesionCore(self, fraction: float) -> FCMTask:
        """Start drawing the lesions again with another lesion core (0 to 0.95: of each lesion, the voxels
        with at least that fraction of its peak membership; 0 keeps them as wide as the decision draws them),
        from the current memberships without running the network."""
        self._checkIdle()
        self._requireSession()
        session = self._session
        return self._submit(_("Redrawing the lesions"),
                            lambda progress, cancel: session.set_lesion_core(float(fraction)), self._applyResult)

    def startSetDropFaintLesions(self, drop: bool) -> FCMTask:
        """Start drawing the result again with the small faint lesions left out (with a CT: predicted lesions
        under 0.5 ml whose lesion membership stays below 0.7, most of them noise; painted lesions stay) or
        kept, from the current memberships without running the network."""
        self._checkIdle()
        self._requireSession()
        session = self._session
        return self._submit(_("Redrawing the lesions"),
                            lambda progress, cancel: session.set_drop_faint_lesions(bool(drop)), self._applyResult)

    def startResetModel(self) -> FCMTask:
        """Start discarding all refinements (back to the loaded model) and re-segmenting."""
        self._checkIdle()
        self._requireSession()
        session = self._session
        return self._submit(_("Resetting the model"), lambda progress, cancel: session.reset(), self._applyResult)

    def startSaveModel(self, path: str) -> FCMTask:
        """Start saving the current (refined) network as a model file."""
        self._checkIdle()
        self._requireSession()
        if not path:
            raise self._userError(_("Choose a file name for the model."))
        session = self._session

        def work(progress, cancel):
            session.save(path)
            return path

        return self._submit(_("Saving the model"), work,
                            lambda saved: _("Model saved to {path}").format(path=saved))

    def segment(self, spectNode, ctNode=None, outputSegmentationNode=None, modelPath: str = "",
                device: str = "auto", patchSize: int = DEFAULT_PATCH, showMemberships: bool = False,
                randomWeights: bool = False, progress=None, alignSpect: bool = True,
                dropFaintLesions: bool = False) -> str:
        """Segment and wait; returns the statistics line. See :meth:`startSegment`."""
        return self.wait(self.startSegment(spectNode, ctNode, outputSegmentationNode, modelPath, device,
                                           patchSize, showMemberships, randomWeights, alignSpect, dropFaintLesions),
                         progress)

    def refine(self, scribbleSegmentationNode, steps: int = DEFAULT_STEPS, alpha: float = DEFAULT_ALPHA,
               beta: float = DEFAULT_BETA, showMemberships: Optional[bool] = None, progress=None) -> str:
        """Refine from painted strokes and wait. See :meth:`startRefine`."""
        return self.wait(self.startRefine(scribbleSegmentationNode, steps, alpha, beta, showMemberships), progress)

    def adapt(self, steps: int = DEFAULT_STEPS, beta: float = DEFAULT_BETA, showMemberships: Optional[bool] = None,
              progress=None) -> str:
        """Adapt without labels and wait. See :meth:`startAdapt`."""
        return self.wait(self.startAdapt(steps, beta, showMemberships), progress)

    def undo(self, progress=None) -> str:
        """Undo the last refinement/adaptation and wait."""
        return self.wait(self.startUndo(), progress)

    def setLesionCore(self, fraction: float, progress=None) -> str:
        """Draw the lesions again with another lesion core and wait. See :meth:`startSetLesionCore`."""
        return self.wait(self.startSetLesionCore(fraction), progress)

    def setDropFaintLesions(self, drop: bool, progress=None) -> str:
        """Leave out or keep the small faint lesions and wait. See :meth:`startSetDropFaintLesions`."""
        return self.wait(self.startSetDropFaintLesions(drop), progress)

    def resetModel(self, progress=None) -> str:
        """Go back to the loaded model and wait."""
        return self.wait(self.startResetModel(), progress)

    def saveModel(self, path: str, progress=None) -> str:
        """Save the current network to ``path`` and wait."""
        return self.wait(self.startSaveModel(path), progress)


def _requirementLines(path: str) -> List[str]:
    with open(path, encoding="utf-8") as handle:
        lines = [line.split("#", 1)[0].strip() for line in handle]
    return [line for line in lines if line and not line.startswith("-")]


def _requirementSatisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (name only if ``packaging`` is absent)."""
    import importlib.metadata

    try:
        from packaging.requirements import Requirement

        parsed = Requirement(requirement)
        name, specifier = parsed.name, parsed.specifier
    except ImportError:
        name, specifier = requirement.split(">")[0].split("=")[0].split("<")[0].strip(), None
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return specifier is None or specifier.contains(installed, prereleases=True)


#
# FCMSegmentationWidget
#


class FCMSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: binds the .ui to the parameter node, starts logic tasks, polls them, shows progress."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[FCMSegmentationLogic] = None
        self._parameterNode: Optional[FCMSegmentationParameterNode] = None
        self._parameterNodeGuiTag = None
        self._task: Optional[FCMTask] = None
        self._afterTask: Optional[Callable[[str], None]] = None
        self._deviceTask: Optional[FCMTask] = None
        self._describedDevice: Optional[str] = None
        self._scribbleEditorNode = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FCMSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FCMSegmentationLogic()

        # Embedded Segment Editor for the strokes: its parameter node first, then the scene.
        editor = self.ui.scribbleEditorWidget
        editor.setMaximumNumberOfUndoStates(10)
        self._selectScribbleEditorNode()
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        editor.setSwitchToSegmentationsButtonVisible(False)
        editor.setEffectNameOrder(["Paint", "Erase"])
        editor.unorderedEffectsVisible = False

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.browseModelButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.defaultModelButton.connect("clicked(bool)", self.onDefaultModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.createScribblesButton.connect("clicked(bool)", self.onCreateScribbles)
        self.ui.refineButton.connect("clicked(bool)", self.onRefine)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.resetModelButton.connect("clicked(bool)", self.onResetModel)
        self.ui.lesionCoreSpinBox.connect("valueChanged(double)", self.onLesionCore)
        self.ui.dropFaintLesionsCheckBox.connect("toggled(bool)", self.onDropFaintLesions)
        self.ui.saveModelButton.connect("clicked(bool)", self.onSaveModel)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdapt)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", self._poll)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.logic is not None:
            self.logic.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        editor = self.ui.scribbleEditorWidget
        self._selectScribbleEditorNode()
        editor.updateWidgetFromMRML()
        editor.setupViewObservations()
        editor.installKeyboardShortcuts()

    def exit(self) -> None:
        editor = self.ui.scribbleEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.forgetSession()
        self.ui.scribbleEditorWidget.setSegmentationNode(None)
        self.ui.scribbleEditorWidget.removeViewObservations()
        self._scribbleEditorNode = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self._selectScribbleEditorNode()
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.spectVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.spectVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[FCMSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets in the .ui carry a "SlicerParameterName" dynamic property naming their field.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._updateGui()

    def _selectScribbleEditorNode(self) -> None:
        """The segment editor parameter node of the strokes editor: overwrite mode "none" so strokes of
        one class never erase strokes of another."""
        node = slicer.mrmlScene.GetSingletonNode(SCRIBBLE_EDITOR_SINGLETON_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.vtkMRMLSegmentEditorNode()
            node.SetSingletonTag(SCRIBBLE_EDITOR_SINGLETON_TAG)
            node = slicer.mrmlScene.AddNode(node)
        node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
        if self._scribbleEditorNode is not node:
            self._scribbleEditorNode = node
            self.ui.scribbleEditorWidget.setMRMLSegmentEditorNode(node)

    # ---- GUI state ---------------------------------------------------------------------------

    def _updateGui(self, caller=None, event=None) -> None:
        p = self._parameterNode
        busy = self.logic.busy if self.logic else False
        session = bool(self.logic and self.logic.hasSession)
        self.ui.segmentButton.enabled = bool(p and p.spectVolume) and not busy
        self.ui.refineButton.enabled = session and bool(p and p.scribbleSegmentation) and not busy
        self.ui.undoButton.enabled = session and self.logic.canUndo and not busy
        self.ui.resetModelButton.enabled = session and not busy
        self.ui.saveModelButton.enabled = session and not busy
        self.ui.adaptButton.enabled = session and not busy
        self.ui.lesionCoreSpinBox.enabled = session and not busy
        self.ui.dropFaintLesionsCheckBox.enabled = not busy
        self.ui.createScribblesButton.enabled = bool(p and p.spectVolume) and not busy
        self.ui.cancelButton.enabled = busy
        self._updateScribbleEditor()
        if p is not None and self._describedDevice is not None and p.device != self._describedDevice:
            self._startDeviceDetection()

    def _updateScribbleEditor(self) -> None:
        editor = self.ui.scribbleEditorWidget
        p = self._parameterNode
        scribbles = p.scribbleSegmentation if p else None
        wantedId = scribbles.GetID() if scribbles else ""
        if editor.segmentationNodeID() != wantedId:
            editor.setSegmentationNode(scribbles)
        source = self.logic.referenceNode if self.logic else None
        if source is None and p is not None:
            source = p.ctVolume or p.spectVolume
        if scribbles is not None and source is not None and editor.sourceVolumeNodeID() != source.GetID():
            editor.setSourceVolumeNode(source)

    def _showDevice(self, text: str) -> None:
        if not text:
            return
        self.ui.deviceLabel.text = text
        onCpu = text.startswith("CPU")
        self.ui.deviceLabel.setStyleSheet("color: #c25e00; font-weight: bold;" if onCpu else "")
        self.ui.deviceLabel.toolTip = _("Running on the CPU works but is much slower than on a GPU.") if onCpu else ""

    def _startDeviceDetection(self) -> None:
        if self._deviceTask is not None or self._parameterNode is None:
            return
        self._describedDevice = self._parameterNode.device
        try:
            self._deviceTask = self.logic.startDescribeDevice(self._describedDevice)
        except Exception as err:  # dependencies missing: the next Segment press reports it
            logging.info("FCMSegmentation: device detection skipped: %s", err)
            return
        self._pollTimer.start()

    # ---- buttons -----------------------------------------------------------------------------

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load FCM Segmentation model"), "",
            _("FCM Segmentation model (*.pt);;All files (*)"))
        if path:
            self._parameterNode.modelPath = path

    def onDefaultModel(self) -> None:
        self._parameterNode.modelPath = ""

    def onSegment(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self.logic.ensureDependencies()
            if self._describedDevice is None:
                self._startDeviceDetection()
            if not p.outputSegmentation:
                p.outputSegmentation = self.logic.createOutputSegmentation(p.spectVolume)
            task = self.logic.startSegment(p.spectVolume, p.ctVolume, p.outputSegmentation, p.modelPath,
                                           p.device, p.patchSize, p.showMemberships, alignSpect=p.alignSpect,
                                           dropFaintLesions=p.dropFaintLesions)
            self._track(task, self._afterSegment)

    def _afterSegment(self, summary: str) -> None:
        self._showLesionCore()
        p = self._parameterNode
        if p is not None and not p.scribbleSegmentation:
            p.scribbleSegmentation = self.logic.createScribbleSegmentation()

    def onCreateScribbles(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not create the strokes segmentation."), waitCursor=True):
            reference = self.logic.referenceNode or p.ctVolume or p.spectVolume
            self.logic.ensureDependencies()
            p.scribbleSegmentation = self.logic.createScribbleSegmentation(reference)

    def onRefine(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Refinement could not start."), waitCursor=True):
            self._track(self.logic.startRefine(p.scribbleSegmentation, p.steps, p.alpha, p.beta, p.showMemberships))

    def onAdapt(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Adaptation could not start."), waitCursor=True):
            self._track(self.logic.startAdapt(p.steps, p.beta, p.showMemberships))

    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            self._track(self.logic.startUndo())

    def _showLesionCore(self) -> None:
        """Show the lesion core the new result was drawn with, without drawing it again."""
        core = self.logic.lesionCore
        if core is not None:
            wasBlocked = self.ui.lesionCoreSpinBox.blockSignals(True)
            self.ui.lesionCoreSpinBox.value = core
            self.ui.lesionCoreSpinBox.blockSignals(wasBlocked)

    def onLesionCore(self, value: float) -> None:
        core = self.logic.lesionCore
        if core is None or self.logic.busy or abs(value - core) < 1e-6:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not redraw the lesions."), waitCursor=True):
            self._track(self.logic.startSetLesionCore(value))

    def onDropFaintLesions(self, drop: bool) -> None:
        """Redraw the current result at once; without one, the choice waits for the next Segment."""
        current = self.logic.dropFaintLesions
        if current is None or self.logic.busy or current == drop:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not redraw the lesions."), waitCursor=True):
            self._track(self.logic.startSetDropFaintLesions(drop))

    def onResetModel(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
                _("Discard all refinements and go back to the loaded model?"), windowTitle=_("Reset model")):
            return
        with slicer.util.tryWithErrorDisplay(_("Reset failed."), waitCursor=True):
            self._track(self.logic.startResetModel())

    def onSaveModel(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Save refined model"), "fcmseg_refined.pt",
            _("FCM Segmentation model (*.pt)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Saving the model failed."), waitCursor=True):
            self._track(self.logic.startSaveModel(path))

    def onCancel(self) -> None:
        self.logic.cancel()
        self.ui.statusLabel.text = _("Cancelling…")

    # ---- polling -----------------------------------------------------------------------------

    def _track(self, task: FCMTask, after: Optional[Callable[[str], None]] = None) -> None:
        self._task = task
        self._afterTask = after
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("{task}…").format(task=task.name)
        self._pollTimer.start()
        self._updateGui()

    def _poll(self) -> None:
        """Every 100 ms on the main thread: show progress, and apply finished results to MRML."""
        deviceTask = self._deviceTask
        if deviceTask is not None and deviceTask.done:
            self._deviceTask = None
            try:
                self._showDevice(self.logic.finish(deviceTask))
            except Exception as err:
                self._showDevice(str(err))
        task = self._task
        if task is None:
            if self._deviceTask is None:
                self._pollTimer.stop()
            return
        fraction, message = task.progress()
        self.ui.progressBar.value = int(round(1000 * min(1.0, max(0.0, fraction))))
        self.ui.statusLabel.text = _("{task}: {message}").format(task=task.name, message=message)
        if not task.done:
            return
        self._task = None
        after, self._afterTask = self._afterTask, None
        try:
            summary = self.logic.finish(task)
        except Exception as err:
            self._showTaskError(task, err)
        else:
            self.ui.progressBar.value = 1000
            self.ui.statusLabel.text = _("{task}: done.").format(task=task.name)
            if summary:
                self.ui.statisticsLabel.text = summary
            self._showDevice(self.logic.lastDevice)
            if after is not None:
                with slicer.util.tryWithErrorDisplay(_("Finishing {task} failed.").format(task=task.name)):
                    after(summary)
        finally:
            if self._deviceTask is None:
                self._pollTimer.stop()
            self._updateGui()

    def _showTaskError(self, task: FCMTask, err: Exception) -> None:
        from FCMSegmentationLib.errors import Cancelled, FCMError

        self.ui.progressBar.value = 0
        if isinstance(err, Cancelled):
            self.ui.statusLabel.text = _("{task}: cancelled; nothing was changed.").format(task=task.name)
            return
        self.ui.statusLabel.text = _("{task} failed.").format(task=task.name)
        if isinstance(err, (FCMError, FCMSegmentationDependencyError)):
            slicer.util.errorDisplay(_("{task} failed: {message}").format(task=task.name, message=err))
        else:
            logging.error(task.job.errorDetails)
            slicer.util.errorDisplay(_("{task} failed unexpectedly: {message}").format(task=task.name, message=err),
                                     detailedText=task.job.errorDetails)


#
# FCMSegmentationTest
#


def syntheticTestSpect(size: int = 36, spacing: float = 4.0, seed: int = 0):
    """A tiny SPECT-like image for the self-test: warm background, a 'spine' cylinder, one hot lesion."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:size, :size, :size].astype(np.float32)
    centre = (size - 1) / 2.0
    body = ((x - centre) ** 2 + (y - centre) ** 2) < (0.45 * size) ** 2
    spine = ((x - centre) ** 2 + (y - centre - 0.2 * size) ** 2) < (0.12 * size) ** 2
    lesion = ((x - centre) ** 2 + (y - centre - 0.2 * size) ** 2 + (z - centre) ** 2) < (0.08 * size) ** 2
    activity = np.where(body, 1.0, 0.05) + 9.0 * spine + 30.0 * lesion
    image = sitk.GetImageFromArray(activity.astype(np.float32))
    image.SetSpacing((spacing,) * 3)
    image = sitk.SmoothingRecursiveGaussian(image, 1.5 * spacing)
    counts = rng.poisson(np.clip(sitk.GetArrayFromImage(image), 0, None) * 20.0).astype(np.float32)
    out = sitk.GetImageFromArray(counts)
    out.SetSpacing((spacing,) * 3)
    out.SetOrigin((-centre * spacing,) * 3)
    return out


class FCMSegmentationTest(ScriptedLoadableModuleTest):
    """CPU-sized end-to-end tests: segment, paint strokes, refine 5 steps, undo, redraw the lesions with
    another lesion core, adapt twice and undo both; and a SPECT/CT pair moved apart by patient motion,
    aligned again through Slicer's volume nodes, its small faint lesions left out and kept again."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentRefineUndo()
        self.setUp()
        self.test_AlignMisregisteredSpect()

    def _segmentArray(self, segmentationNode, name, referenceNode):
        segmentId = segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(name)
        self.assertTrue(segmentId, "segment %r missing" % name)
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceNode)

    def test_SegmentRefineUndo(self):
        import numpy as np
        import SimpleITK as sitk
        import sitkUtils

        self.delayDisplay("Building a small synthetic SPECT case")
        spectImage = syntheticTestSpect()
        spectNode = sitkUtils.PushVolumeToSlicer(spectImage, None, "FCMTestSPECT", "vtkMRMLScalarVolumeNode")
        volumeShape = slicer.util.arrayFromVolume(spectNode).shape

        logic = FCMSegmentationLogic()
        logic.ensureDependencies()
        randomWeights = not logic.defaultModelAvailable()
        if randomWeights:
            self.delayDisplay("No shipped default model: using random weights (tests the plumbing, not accuracy)")

        self.delayDisplay("Segmenting on the CPU")
        outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "FCMTestSegmentation")
        logic.segment(spectNode, None, outputNode, device="cpu", randomWeights=randomWeights)
        labels = logic.lastResult.labels
        self.assertEqual(labels.GetSize(), spectImage.GetSize())
        np.testing.assert_allclose(labels.GetSpacing(), spectImage.GetSpacing(), rtol=1e-5)
        np.testing.assert_allclose(labels.GetOrigin(), spectImage.GetOrigin(), atol=1e-3)
        before = sitk.GetArrayFromImage(labels).copy()
        boneBefore = self._segmentArray(outputNode, "Bone", spectNode)
        lesionBefore = self._segmentArray(outputNode, "Lesion", spectNode)
        self.assertEqual(boneBefore.shape, volumeShape)
        np.testing.assert_array_equal(boneBefore > 0, before == 1)
        np.testing.assert_array_equal(lesionBefore > 0, before == 2)

        self.delayDisplay("Painting strokes")
        strokesNode = logic.createScribbleSegmentation(spectNode)
        segmentation = strokesNode.GetSegmentation()
        size = volumeShape[0]
        mid = size // 2
        spineRow = int(round((size - 1) / 2.0 + 0.2 * size))
        strokes = {
            "Background": (slice(mid - 1, mid + 2), slice(2, 6), slice(mid - 6, mid + 6)),
            "Bone": (slice(mid - 8, mid - 4), slice(spineRow - 1, spineRow + 2), slice(mid - 1, mid + 2)),
            "Lesion": (slice(mid - 1, mid + 2), slice(spineRow - 1, spineRow + 2), slice(mid - 1, mid + 2)),
        }
        for index, (name, region) in enumerate(strokes.items()):
            segmentId = segmentation.GetSegmentIdBySegmentName(name) or segmentation.GetNthSegmentID(index)
            mask = np.zeros(volumeShape, dtype=np.uint8)
            mask[region] = 1
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, strokesNode, segmentId, spectNode)
        codes = sitk.GetArrayFromImage(logic._mrml().read_scribbles(strokesNode, spectNode))
        self.assertEqual(set(np.unique(codes)) - {0}, {1, 2, 3})

        self.delayDisplay("Refining 5 steps")
        logic.refine(strokesNode, steps=5, alpha=1.0)
        self.assertTrue(logic.canUndo)

        self.delayDisplay("Undo")
        logic.undo()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(logic.lastResult.labels), before)
        np.testing.assert_array_equal(self._segmentArray(outputNode, "Bone", spectNode), boneBefore)
        np.testing.assert_array_equal(self._segmentArray(outputNode, "Lesion", spectNode), lesionBefore)

        self.delayDisplay("Lesions redrawn with the lesion core off, then as calibrated")
        calibratedCore = logic.lesionCore
        logic.setLesionCore(0.0)
        wide = sitk.GetArrayFromImage(logic.lastResult.labels)
        self.assertGreaterEqual(int((wide == 2).sum()), int((before == 2).sum()))
        np.testing.assert_array_equal(self._segmentArray(outputNode, "Lesion", spectNode) > 0, wide == 2)
        logic.setLesionCore(calibratedCore)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(logic.lastResult.labels), before)

        self.delayDisplay("Adapting without labels twice, then undoing both")
        logic.adapt(steps=5)
        logic.adapt(steps=5)
        adapted = sitk.GetArrayFromImage(logic.lastResult.labels)
        np.testing.assert_array_equal(self._segmentArray(outputNode, "Bone", spectNode) > 0, adapted == 1)
        if not randomWeights:  # a small adjustment: the calls in a row share one anchor, so they cannot drift
            self.assertGreater(float((adapted == before).mean()), 0.95)
        logic.undo()
        logic.undo()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(logic.lastResult.labels), before)
        self.delayDisplay("Test passed")

    def test_AlignMisregisteredSpect(self):
        import dataclasses

        import numpy as np
        import SimpleITK as sitk
        import sitkUtils
        from FCMSegmentationLib.phantoms import TRAINING_RANGES, misregistration_transform, procedural_phantom

        self.delayDisplay("Simulating a SPECT/CT phantom with the SPECT moved 4 mm and turned 2 degrees")
        ranges = dataclasses.replace(TRAINING_RANGES, field_width_mm=(300.0, 300.0), field_length_mm=(160.0, 160.0),
                                     ct_spacing_mm=(3.0, 3.0), ct_slice_mm=(3.0, 3.0),
                                     misregistration_shift_mm=(4.0, 4.0), misregistration_rotation_deg=(2.0, 2.0))
        phantom = procedural_phantom(33, ranges)
        spectNode = sitkUtils.PushVolumeToSlicer(phantom.spect, None, "FCMTestSPECT", "vtkMRMLScalarVolumeNode")
        ctNode = sitkUtils.PushVolumeToSlicer(phantom.ct, None, "FCMTestCT", "vtkMRMLScalarVolumeNode")

        logic = FCMSegmentationLogic()
        logic.ensureDependencies()
        self.delayDisplay("Segmenting with the alignment on")
        logic.segment(spectNode, ctNode, device="cpu", randomWeights=not logic.defaultModelAvailable())
        self.assertTrue(any(note.startswith("SPECT aligned to the CT") for note in logic.lastResult.notes),
                        logic.lastResult.notes)
        found = logic._session.case.alignment.transform
        truth = misregistration_transform(phantom.params)
        centre = np.array(truth.GetCenter())
        points = [centre + offset for offset in ([0, 0, 0], [60, 0, 0], [0, 60, 0], [0, 0, 40])]
        error = max(np.linalg.norm(np.subtract(found.TransformPoint(p.tolist()), truth.TransformPoint(p.tolist())))
                    for p in points)
        self.assertLess(error, 1.5, "the alignment found through the volume nodes is off by %.1f mm" % error)

        self.delayDisplay("Small faint lesions left out, then kept again")
        kept = sitk.GetArrayFromImage(logic.lastResult.labels)
        logic.setDropFaintLesions(True)
        dropped = sitk.GetArrayFromImage(logic.lastResult.labels)
        self.assertFalse(np.any((dropped == 2) & (kept != 2)), "leaving faint lesions out added lesion voxels")
        logic.setDropFaintLesions(False)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(logic.lastResult.labels), kept)

        self.delayDisplay("Showing the SPECT where it was segmented")
        from FCMSegmentationLib import mrml
        from FCMSegmentationLib.alignment import move_spect

        transformNode = slicer.mrmlScene.GetFirstNodeByName(mrml.ALIGNMENT_NODE_NAME)
        self.assertIsNotNone(transformNode, "no alignment transform node was made")
        spectNode.SetAndObserveTransformNodeID(transformNode.GetID())
        shown, expected = mrml.volume_node_to_sitk(spectNode), move_spect(phantom.spect, found)
        np.testing.assert_allclose(shown.GetOrigin(), expected.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(shown.GetDirection(), expected.GetDirection(), atol=1e-6)
        self.delayDisplay("Test passed")
