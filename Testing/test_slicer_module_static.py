"""Static checks of the Slicer module and the Extension Manager packaging (no Slicer needed).

Each ``check_*`` function takes the repository root and returns a list of problems (empty: fine), so
the checks can also be exercised on a modified copy of the tree. The tests assert the lists are empty
and print every problem found.
"""
import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = "FCMSegmentation"

# Keys allowed by slicer-extension-catalog-entry-schema-v1.0.2.json ("additionalProperties": false) and
# the ones it requires; this project uses only the subset below (the team's Slicer conventions,
# ../shared/docs/slicer.md).
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.2.json")
SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
PROJECT_KEYS = {"$schema", "category", "scm_url", "scm_revision", "build_dependencies", "build_subdirectory",
                "dicom_support_rule"}

# Widget classes each parameter type can bind to (slicer/parameterNodeWrapper/guiConnectors.py, which
# matches on the exact widget class).
CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}

# Top-level imports that would make Slicer load torch or the engine's compute code with the module.
FORBIDDEN_TOP_LEVEL = ("torch", "FCMSegmentationLib", "scipy", "PyTorchUtils", "SampleData", "sitkUtils")

TEXT_SUFFIXES = {".py", ".ui", ".txt", ".md", ".json", ".toml", ".cfg", ".ini", ".yml", ".yaml", ".cmake", ".in",
                 ".sh", ".xml", ".csv", ".rst", ".typed"}
TEXT_NAMES = {"CMakeLists.txt", "Makefile", "LICENSE", "run", ".gitignore", ".gitattributes"}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".venv", "out", ".whl"}


def module_dir(root: Path) -> Path:
    return root / MODULE


def module_file(root: Path) -> Path:
    return module_dir(root) / f"{MODULE}.py"


def ui_file(root: Path) -> Path:
    return module_dir(root) / "Resources" / "UI" / f"{MODULE}.ui"


def parse_ui(root: Path) -> ET.Element:
    return ET.parse(ui_file(root)).getroot()


def ui_widgets(root: Path) -> Dict[str, str]:
    """Widget name -> class for every widget in the .ui."""
    return {w.get("name"): w.get("class") for w in parse_ui(root).iter("widget")}


def ui_parameter_bindings(root: Path) -> List[Tuple[str, str, str]]:
    """(SlicerParameterName, widget name, widget class) for every bound widget."""
    bindings = []
    for widget in parse_ui(root).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.append((prop.findtext("string", default=""), widget.get("name"), widget.get("class")))
    return bindings


def parameter_node_fields(root: Path) -> Dict[str, ast.expr]:
    """Field name -> annotation of the @parameterNodeWrapper class in the module."""
    tree = ast.parse(module_file(root).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper")
                or (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "parameterNodeWrapper")
                for d in node.decorator_list):
            return {stmt.target.id: stmt.annotation for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)}
    return {}


def annotation_kind(annotation: ast.expr) -> str:
    """'bool', 'int', 'float', 'str', 'Path', 'node' or '' for an annotation (Annotated[...] unwrapped)."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) in ("Annotated", "Optional"):
        inner = annotation.slice
        inner = getattr(inner, "value", inner)  # Python 3.8 ast.Index
        if isinstance(inner, ast.Tuple):
            inner = inner.elts[0]
        return annotation_kind(inner)
    name = getattr(annotation, "id", None) or getattr(annotation, "attr", None) or ""
    if name.startswith("vtkMRML"):
        return "node"
    if name in ("Path", "PurePath"):
        return "Path"
    return name if name in CONNECTORS else ""


def annotation_node_class(annotation: ast.expr) -> str:
    if isinstance(annotation, ast.Subscript):
        inner = getattr(annotation.slice, "value", annotation.slice)
        return annotation_node_class(inner.elts[0] if isinstance(inner, ast.Tuple) else inner)
    return getattr(annotation, "id", "") or getattr(annotation, "attr", "")


def has_choice(annotation: ast.expr) -> bool:
    return any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Choice" for n in ast.walk(annotation))


# ---- checks -------------------------------------------------------------------------------------


def check_ui_names(root: Path) -> List[str]:
    """Every self.ui.<name> used in the module is a widget in the .ui."""
    used = set(re.findall(r"\bself\.ui\.(\w+)", module_file(root).read_text(encoding="utf-8")))
    widgets = set(ui_widgets(root))
    return [f"self.ui.{name} is used in {MODULE}.py but no widget named {name!r} is in the .ui"
            for name in sorted(used - widgets)]


def check_parameter_bindings(root: Path) -> List[str]:
    """Every SlicerParameterName names a field; each field is bound once, to a widget that can show it."""
    fields = parameter_node_fields(root)
    problems = [] if fields else [f"no @parameterNodeWrapper class found in {MODULE}.py"]
    seen: Dict[str, str] = {}
    for parameter, widget, cls in ui_parameter_bindings(root):
        if parameter not in fields:
            problems.append(f"widget {widget!r} has SlicerParameterName {parameter!r}, which is not a field of "
                            f"the parameter node (fields: {', '.join(sorted(fields))})")
            continue
        if parameter in seen:
            problems.append(f"SlicerParameterName {parameter!r} is on both {seen[parameter]!r} and {widget!r}")
        seen[parameter] = widget
        kind = annotation_kind(fields[parameter])
        if kind and cls not in CONNECTORS[kind]:
            problems.append(f"field {parameter!r} ({kind}) is bound to {widget!r} of class {cls}; "
                            f"connectGui supports {sorted(CONNECTORS[kind])}")
        if cls == "QComboBox" and kind != "" and not has_choice(fields[parameter]):
            problems.append(f"field {parameter!r} is bound to a QComboBox but has no Choice(...) annotation")
        if kind == "node" and cls == "qMRMLNodeComboBox":
            types = [s.text for w in parse_ui(root).iter("widget") if w.get("name") == widget
                     for p in w.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            wanted = annotation_node_class(fields[parameter])
            if types and wanted not in types:
                problems.append(f"{widget!r} lists node types {types} but field {parameter!r} is {wanted}")
    for name in sorted(set(fields) - set(seen)):
        problems.append(f"parameter node field {name!r} is bound to no widget in the .ui")
    return problems


def cmake_list(text: str, variable: str, module_name: str) -> List[str]:
    match = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    if not match:
        return []
    items = []
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        items.extend(token.replace("${MODULE_NAME}", module_name) for token in line.split())
    return items


def disk_scripts_and_resources(root: Path) -> Tuple[Set[str], Set[str]]:
    """Files that must be installed: every .py of the module and its Lib, and every resource."""
    base = module_dir(root)
    scripts = {f"{MODULE}.py"}
    resources: Set[str] = set()
    lib = base / f"{MODULE}Lib"
    for path in lib.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        rel = path.relative_to(base).as_posix()
        (scripts if path.suffix == ".py" else resources).add(rel)
    for path in (base / "Resources").rglob("*"):
        if path.is_file() and path.name != ".gitkeep":
            resources.add(path.relative_to(base).as_posix())
    return scripts, resources


def check_cmake_lists(root: Path) -> List[str]:
    """The module CMakeLists SCRIPTS and RESOURCES lists equal the files on disk."""
    text = (module_dir(root) / "CMakeLists.txt").read_text(encoding="utf-8")
    name_match = re.search(r"set\(\s*MODULE_NAME\s+(\S+)\s*\)", text)
    module_name = name_match.group(1) if name_match else MODULE
    listed_scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS", module_name)
    listed_resources = cmake_list(text, "MODULE_PYTHON_RESOURCES", module_name)
    scripts, resources = disk_scripts_and_resources(root)
    problems = []
    for kind, listed, on_disk in (("SCRIPTS", listed_scripts, scripts), ("RESOURCES", listed_resources, resources)):
        duplicates = sorted({item for item in listed if listed.count(item) > 1})
        if duplicates:
            problems.append(f"{kind}: listed twice: {duplicates}")
        missing = sorted(on_disk - set(listed))
        extra = sorted(set(listed) - on_disk)
        if missing:
            problems.append(f"{kind}: on disk but not listed in {MODULE}/CMakeLists.txt: {missing}")
        if extra:
            problems.append(f"{kind}: listed in {MODULE}/CMakeLists.txt but not on disk: {extra}")
    for required in ("slicerMacroBuildScriptedModule", "WITH_GENERIC_TESTS", "slicer_add_python_unittest",
                     "add_subdirectory(Testing)"):
        if required not in text:
            problems.append(f"{MODULE}/CMakeLists.txt lacks {required}")
    if "add_subdirectory(Testing)" in text:
        for sub in ("Testing/CMakeLists.txt", "Testing/Python/CMakeLists.txt"):
            if not (module_dir(root) / sub).is_file():
                problems.append(f"{MODULE}/{sub} is missing (add_subdirectory needs it)")
    return problems


def check_extension_cmake(root: Path) -> List[str]:
    """Top-level CMakeLists has the extension metadata and its URLs point at files in this repository."""
    text = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    problems = []
    for required in ("cmake_minimum_required", f"project({MODULE})", "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY",
                     "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                     "EXTENSION_SCREENSHOTURLS", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                     f"add_subdirectory({MODULE})", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                     "include(${Slicer_EXTENSION_CPACK})"):
        if required not in text:
            problems.append(f"CMakeLists.txt lacks {required}")
    if not re.search(r'set\(EXTENSION_DEPENDS\s+"?PyTorch"?\s*\)', text):
        problems.append("CMakeLists.txt: EXTENSION_DEPENDS must be PyTorch")
    if not re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\s*\)', text):
        problems.append('CMakeLists.txt: EXTENSION_CATEGORY must be "Segmentation"')
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        match = re.search(r"set\(" + variable + r'\s+"([^"]*)"', text)
        urls = match.group(1).split() if match else []
        if not urls:
            problems.append(f"CMakeLists.txt: {variable} is empty")
        for url in urls:
            raw = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)$", url)
            if not raw:
                problems.append(f"{variable}: {url} is not a raw.githubusercontent.com URL into this repository")
            elif not (root / raw.group(1)).is_file():
                problems.append(f"{variable}: {url} points at {raw.group(1)}, which is not in the repository")
            elif not (root / raw.group(1)).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"):
                problems.append(f"{variable}: {raw.group(1)} is not a PNG image")
    return problems


def check_index_json(root: Path) -> List[str]:
    path = root / f"{MODULE}.json"
    if not path.is_file():
        return [f"{path.name} (ExtensionsIndex entry) is missing"]
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return [f"{path.name} is not valid JSON: {err}"]
    problems = []
    keys = set(entry)
    if keys - SCHEMA_KEYS:
        problems.append(f"{path.name}: keys not allowed by the v1.0.2 schema: {sorted(keys - SCHEMA_KEYS)}")
    if keys - PROJECT_KEYS:
        problems.append(f"{path.name}: keys outside this project's convention: {sorted(keys - PROJECT_KEYS)}")
    if SCHEMA_REQUIRED - keys:
        problems.append(f"{path.name}: required keys missing: {sorted(SCHEMA_REQUIRED - keys)}")
    if entry.get("$schema", "").rstrip("#") != SCHEMA_URL:
        problems.append(f"{path.name}: $schema must be {SCHEMA_URL}")
    expected = {"category": "Segmentation", "scm_revision": "main", "build_dependencies": ["PyTorch"],
                "build_subdirectory": "."}
    for key, value in expected.items():
        if entry.get(key) != value:
            problems.append(f"{path.name}: {key} is {entry.get(key)!r}, expected {value!r}")
    for key in ("category", "scm_url", "scm_revision", "dicom_support_rule", "build_subdirectory"):
        if key in entry and not isinstance(entry[key], str):
            problems.append(f"{path.name}: {key} must be a string")
    if "NM" not in entry.get("dicom_support_rule", ""):
        problems.append(f"{path.name}: dicom_support_rule should accept NM (SPECT) series")
    return problems


def python_files(root: Path) -> List[Path]:
    lib = module_dir(root) / f"{MODULE}Lib"
    return [module_file(root)] + sorted(p for p in lib.rglob("*.py") if "__pycache__" not in p.parts)


def check_python39(root: Path) -> List[str]:
    """The module and the Lib parse as Python 3.9; no PEP 604 unions in annotations (evaluated by Slicer)."""
    problems = []
    for path in python_files(root):
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(root).as_posix()
        try:
            tree = ast.parse(source, filename=rel, feature_version=(3, 9))
        except SyntaxError as err:
            problems.append(f"{rel}:{err.lineno}: not Python 3.9 syntax: {err.msg}")
            continue
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                     and any(a.name == "annotations" for a in n.names) for n in tree.body)
        if future:
            continue
        annotations = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                args += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                annotations += [a.annotation for a in args if a.annotation is not None]
                if node.returns is not None:
                    annotations.append(node.returns)
            elif isinstance(node, ast.AnnAssign):
                annotations.append(node.annotation)
        for annotation in annotations:
            for sub in ast.walk(annotation):
                if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.BitOr):
                    problems.append(f"{rel}:{sub.lineno}: 'X | Y' annotation needs Python 3.10; use Optional/Union")
    return problems


def check_vermin(root: Path) -> List[str]:
    if shutil.which("vermin") is None:
        try:
            import vermin  # noqa: F401
        except ImportError:
            pytest.skip("vermin not installed")
        command = [sys.executable, "-m", "vermin"]
    else:
        command = ["vermin"]
    files = [str(p) for p in python_files(root)]
    run = subprocess.run(command + ["--target=3.9-", "--eval-annotations", "--no-tips", "--violations"] + files,
                         capture_output=True, text=True)
    return [] if run.returncode == 0 else [f"vermin: Python 3.9 target not met:\n{run.stdout}{run.stderr}"]


def check_ui_xml(root: Path) -> List[str]:
    try:
        tree = parse_ui(root)
    except ET.ParseError as err:
        return [f"{ui_file(root).name} is not well-formed XML: {err}"]
    problems = []
    if tree.tag != "ui":
        problems.append(f"{ui_file(root).name}: root element is <{tree.tag}>, expected <ui>")
    names = [w.get("name") for w in tree.iter("widget")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"{ui_file(root).name}: duplicate widget names {duplicates}")
    declared = {c.findtext("class") for c in tree.iter("customwidget")}
    qt_classes = re.compile(r"^Q[A-Z]")
    for cls in sorted({w.get("class") for w in tree.iter("widget")}):
        if not qt_classes.match(cls) and cls not in declared:
            problems.append(f"{ui_file(root).name}: custom widget class {cls} is not declared in <customwidgets>")
    return problems


def png_size(path: Path) -> Tuple[int, int]:
    data = path.read_bytes()[:24]
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return (-1, -1)
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def check_icons(root: Path) -> List[str]:
    problems = []
    for folder in (module_dir(root), root):
        path = folder / "Resources" / "Icons" / f"{MODULE}.png"
        if not path.is_file():
            problems.append(f"{path.relative_to(root)} is missing")
        elif png_size(path) != (128, 128):
            problems.append(f"{path.relative_to(root)} must be a 128x128 PNG, is {png_size(path)}")
    return problems


def text_files(root: Path) -> List[Path]:
    files = []
    for path in root.rglob("*"):
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in path.relative_to(root).parts):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
            files.append(path)
    return files


def check_line_endings(root: Path) -> List[str]:
    return [f"{p.relative_to(root)} has CR line endings (use LF)" for p in text_files(root) if b"\r" in p.read_bytes()]


def check_lazy_imports(root: Path) -> List[str]:
    """No top-level import of torch, the engine, or extension-provided modules (only at first use)."""
    tree = ast.parse(module_file(root).read_text(encoding="utf-8"))
    problems = []

    def visit(statements):
        for node in statements:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_TOP_LEVEL:
                    problems.append(f"{MODULE}.py:{node.lineno}: top-level import of {name} (import it inside "
                                    "the method that needs it)")
            # imports nested in top-level if/try/with blocks also run at load time, except for type checkers
            checking_only = isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                                     "typing.TYPE_CHECKING")
            for field in ("orelse",) if checking_only else ("body", "orelse", "finalbody", "handlers"):
                block = getattr(node, field, None)
                if isinstance(block, list) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.ClassDef)):
                    visit(block)

    visit(tree.body)
    # class bodies run at load time too (not their methods)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            visit([n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))])
    return problems


def check_license(root: Path) -> List[str]:
    return [] if (root / "LICENSE").is_file() else ["LICENSE is missing at the repository root"]


# ---- tests --------------------------------------------------------------------------------------


def assert_no_problems(problems: List[str]) -> None:
    assert not problems, "\n".join(problems)


# Module constant, .ui widget and engine setting that must agree: the module duplicates the engine's
# defaults because it may not import the engine at load time.
REFINE_DEFAULTS = (("DEFAULT_STEPS", "stepsSpinBox", "steps"), ("DEFAULT_ALPHA", "alphaSpinBox", "alpha"),
                   ("DEFAULT_BETA", "betaSpinBox", "beta"))


def module_constants(root: Path) -> Dict[str, object]:
    tree = ast.parse(module_file(root).read_text(encoding="utf-8"))
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and isinstance(node.value, ast.Constant)}


def check_refine_defaults(root: Path) -> List[str]:
    """The module's refine defaults and the .ui's initial values equal ``RefineSettings``' defaults."""
    from FCMSegmentationLib.refinement import RefineSettings

    engine, constants = RefineSettings(), module_constants(root)
    widgets = {w.get("name"): w for w in ET.parse(ui_file(root)).iter("widget")}
    problems = []
    for constant, widget, setting in REFINE_DEFAULTS:
        expected = getattr(engine, setting)
        if constants.get(constant) != expected:
            problems.append(f"{constant} = {constants.get(constant)!r}, RefineSettings.{setting} = {expected!r}")
        value = widgets[widget].find("./property[@name='value']/*") if widget in widgets else None
        if value is None or float(value.text) != float(expected):
            shown = None if value is None else value.text
            problems.append(f"{widget} starts at {shown}, RefineSettings.{setting} = {expected!r}")
    return problems


def test_ui_names_used_in_module_exist():
    assert_no_problems(check_ui_names(ROOT))


def test_slicer_parameter_names_match_parameter_node_fields():
    assert_no_problems(check_parameter_bindings(ROOT))


def test_cmake_lists_match_files_on_disk():
    assert_no_problems(check_cmake_lists(ROOT))


def test_extension_cmake_metadata():
    assert_no_problems(check_extension_cmake(ROOT))


def test_index_json_keys():
    assert_no_problems(check_index_json(ROOT))


def test_module_and_lib_parse_as_python39():
    assert_no_problems(check_python39(ROOT))


def test_module_and_lib_python39_vermin():
    assert_no_problems(check_vermin(ROOT))


def test_ui_is_well_formed_xml():
    assert_no_problems(check_ui_xml(ROOT))


def test_icons_are_128px_png():
    assert_no_problems(check_icons(ROOT))


def test_text_files_use_lf():
    assert_no_problems(check_line_endings(ROOT))


def test_module_has_no_heavy_top_level_imports():
    assert_no_problems(check_lazy_imports(ROOT))


def test_lazy_import_check_flags_imports_that_run_at_load_but_not_type_checking_ones(tmp_path):
    module = module_file(tmp_path)
    module.parent.mkdir(parents=True)
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                      "else:\n    import scipy\ntry:\n    import FCMSegmentationLib\nexcept ImportError:\n    pass\n"
                      "def later():\n    import torch\n", encoding="utf-8")
    problems = check_lazy_imports(tmp_path)
    assert [p.split(": ")[1] for p in problems] == ["top-level import of scipy (import it inside the method that "
                                                    "needs it)", "top-level import of FCMSegmentationLib (import it "
                                                    "inside the method that needs it)"]


def test_license_at_root():
    assert_no_problems(check_license(ROOT))


def test_refine_defaults_match_the_engine():
    assert_no_problems(check_refine_defaults(ROOT))
