"""torch.hub's entry: `torch.hub.load("<path of the clone>", "landmarker", source="local")`; the project's files are imported under their own names only while it loads, so a user's own model.py, errors.py or dataset.py stay as they were."""
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
dependencies = ["torch", "torchvision", "numpy", "PIL", "cv2"]


def is_ours(module) -> bool:
    """Whether a loaded module is one of this clone's files."""
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent == HERE


def import_isolated(name: str):
    """The project's module `name`, imported with this clone first on the path. A module of the same name that
    the user had loaded (their own model.py, say) is put aside meanwhile and put back after; the project's
    modules that this import loaded leave sys.modules again, so that the user's `import model` still finds
    their own. The project's modules keep one another: each holds what it imported."""
    names = [p.stem for p in HERE.glob("*.py") if p.stem != "hubconf" and not p.stem.startswith(("test_", "conftest"))]
    theirs = {n: sys.modules.pop(n) for n in names if n in sys.modules and not is_ours(sys.modules[n])}
    before = set(sys.modules)
    sys.path.insert(0, str(HERE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(HERE))
        for n in names:
            if n not in before and n in sys.modules and is_ours(sys.modules[n]):
                del sys.modules[n]
        sys.modules.update(theirs)


faces = import_isolated("faces")


def landmarker(**kwargs) -> "faces.Landmarker":
    """The released weights with OpenCV's YuNet in front: call it on a path, a PIL image or a numpy array for a
    list of faces, each with .box, .points, .scores, .pose and .to_dict(). Takes faces.Landmarker's keywords
    (docs/python.md)."""
    return faces.Landmarker(**kwargs)
