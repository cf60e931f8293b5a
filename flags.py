"""What users type, checked: the argparse validators every script shares, and the boundary where a library error becomes one line."""
import argparse
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import Error, UsageError
from landmarks import Box

# numpy's and Python's seeders take at most 32 bits; train.py adds the rank and the epoch.
SEED_MAX = 2**31 - 1
# Data-loading and photo processes: each holds a copy of the network or the loader, so far fewer than this fit
# on any one machine; beyond it a typo (100000) would only hang the run.
WORKERS_MAX = 64


def number_in(kind: type, low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse `type=`: the text as `kind` (int or float) inside [low, high] (open where asked), else
    argparse's one-line error naming the flag and the range. NaN and infinity are never inside."""
    show = (lambda v: str(int(v))) if kind is int else (lambda v: f"{v:g}")
    bounds = ([f"{'above' if low_open else 'at least'} {show(low)}"] if low is not None else []) + \
             ([f"{'below' if high_open else 'at most'} {show(high)}"] if high is not None else [])
    wanted = f"{'a whole number' if kind is int else 'a number'} {' and '.join(bounds)}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        inside = (math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
                  and (high is None or (value < high if high_open else value <= high)))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def markup_file(path: Path, key: str, what: str):
    """A JSON file holding `key`'s value, or the value alone: [[i, j], ...] mirror pairs, or [i, j]."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path}: cannot read {what} ({e})") from None
    return value.get(key) if isinstance(value, dict) else value


def flip_pairs_arg(text: str) -> list[list[int]]:
    """An argparse `type=` for --flip-pairs: a JSON file holding [[i, j], ...] (alone, or as "flip_pairs" of
    a markup file such as importers.py writes for WFLW), or the pairs written out as "0,3 1,2". Whether the
    points exist is checked once the labels say how many there are."""
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        pairs = markup_file(path, "flip_pairs", "mirror pairs")
        where = str(path)
    else:
        pairs = [[int(v) for v in pair.split(",")] if all(v.strip().isdigit() for v in pair.split(","))
                 else pair for pair in text.split()]
        where = repr(text)
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and
                                            all(isinstance(v, int) and v >= 0 for v in p) for p in pairs)):
        raise argparse.ArgumentTypeError(f"{where}: expected mirror pairs of point numbers, such as "
                                         f"\"0,3 1,2\" or a JSON file holding [[0, 3], [1, 2]]")
    return sorted(sorted(pair) for pair in pairs)  # in one order, so that --resume sees "1,2 3,0" as "0,3 1,2"


def point_pair_arg(text: str) -> list[int]:
    """An argparse `type=` for --nme-points: two point numbers, "I,J", or a JSON file holding [I, J] (alone,
    or as "nme_points" of a markup file)."""
    path = Path(text)
    if path.suffix.lower() == ".json" or path.is_file():
        points = markup_file(path, "nme_points", "NME points")
        text = ",".join(map(str, points)) if isinstance(points, list) else repr(points)
    values = text.split(",")
    if len(values) != 2 or not all(v.strip().isdigit() for v in values) or int(values[0]) == int(values[1]):
        raise argparse.ArgumentTypeError(f"expected two different point numbers I,J, got {text!r}")
    return sorted(int(v) for v in values)  # a distance: "45,36" is the run "36,45" (for --resume)


def can_write_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, by making (and removing) an empty folder there: os.access says
    yes to root for /proc and /sys, where nothing can be made."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=folder))
    except OSError:
        return False
    return True


def folder_problem(path: Path) -> str | None:
    """Why `path` can be neither used nor made as an output folder, or None."""
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a folder"
        return None if can_write_in(path) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path} cannot be made: {parent} is a file, not a folder"
    return None if can_write_in(parent) else f"{path} cannot be made: {parent} is not writable"


def out_folder(text: str) -> str:
    """An argparse `type=` for --out/--out-dir folders: one that exists or can be made."""
    problem = folder_problem(Path(text))
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


# What matplotlib writes a figure as; a figure named otherwise is refused before the run that draws it.
FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def figure_file(text: str) -> str:
    """An argparse `type=` for a figure to write: an out_file whose name ends in a FIGURE_SUFFIXES suffix."""
    if Path(text).suffix.lower() not in FIGURE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: expected a picture's name ending in {', '.join(FIGURE_SUFFIXES)}")
    return out_file(text)


def out_file(text: str) -> str:
    """An argparse `type=` for a file to write: not a folder, and in a folder that exists or can be made."""
    path = Path(text)
    problem = f"{path} is a folder; expected a file name" if path.is_dir() else folder_problem(path.parent)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def refuse_input_as_output(flag: str, out: str | Path, inputs: list[str | Path]) -> None:
    """UsageError when the file a flag writes is one the run reads: writing it would lose that input. The
    same file under another name (a link) counts too."""
    for given in inputs:
        same_name = Path(out).resolve() == Path(given).resolve()
        if same_name or (Path(out).is_file() and Path(given).is_file() and os.path.samefile(out, given)):
            raise UsageError(f"{flag} {out}: that is the input {given}, which this would overwrite; write elsewhere")


def box_arg(text: str) -> Box:
    """--box left,top,width,height in image pixels."""
    try:
        box = Box(*(float(v) for v in text.split(",")))
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected four numbers, left,top,width,height") from None
    if not all(map(math.isfinite, box)):
        raise argparse.ArgumentTypeError(f"{text!r}: expected four finite numbers")
    if box.width <= 0 or box.height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return box


@contextmanager
def one_line_errors(quiet: bool = False, flags: dict[str, str] | None = None) -> Iterator[None]:
    """A script's boundary: a library Error ends the run with its one-line message (exit 1), a parameter it
    names said as the flag that set it (`--name`, or as `flags` maps it: {"source": "--video"}), and Ctrl-C
    with one line and exit 130, never a traceback. Whatever was written was written atomically, so nothing
    half-done is left behind. `quiet`: the same exits without the line (the other processes of a
    multi-process run, whose rank 0 says it)."""
    try:
        yield
    except Error as e:
        raise SystemExit(1 if quiet else e.for_flags(flags)) from None
    except KeyboardInterrupt:
        if not quiet:
            print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None


def worker_pool(workers: int, initializer: Callable, initargs: tuple = ()) -> multiprocessing.pool.Pool:
    """A pool of processes that start clean, forked from a server process that has imported only the
    initializer's module (spawned where the system has no fork server). A worker forked from the caller
    itself inherits its threads' locks half-held: one whose garbage collector freed an onnxruntime session
    inherited from a Landmarker of the caller waited for that session's threads for ever."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([initializer.__module__])  # a no-op once the server runs
    else:
        context = multiprocessing.get_context("spawn")
    return context.Pool(workers, initializer, initargs)


def ignore_ctrl_c() -> None:
    """A pool worker's initializer: Ctrl-C reaches every process of the terminal's group, and the parent
    alone answers it (ending the pool, with one line); a worker's own traceback would bury that line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
