"""Landmarks on video: frames read from a file or a camera ahead of the network, tracked (tracking.py), and written behind it as JSON Lines and an annotated MP4, on threads of their own."""
import json
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from errors import DataError, OutputError
from files import read_json_lines
from looks import face_fields
from tracking import FaceTracker, TrackedFace

import cv2  # noqa: E402  (after detectors, which sets OpenCV's log levels before cv2 first loads)

# OpenCV takes a camera's number as a C int; no machine has anywhere near this many.
MAX_CAMERA = 9999
# Frames decoded ahead of the network, and frames drawn, encoded and written behind it, each on a thread of its
# own (OpenCV's decoder and encoder and onnxruntime release the GIL): a few, so memory stays flat.
READ_AHEAD, WRITE_BEHIND = 4, 4


# ---------------------------------------------------------------- reading, drawing, writing

def open_video(source: str) -> cv2.VideoCapture:
    """A file, or camera N for a number; one line if it cannot be opened."""
    if source.isdigit():
        if int(source) > MAX_CAMERA:
            raise DataError(f"source={source}: camera numbers go from 0 to {MAX_CAMERA}", parameter="source")
        capture = cv2.VideoCapture(int(source))
        if not capture.isOpened():
            raise DataError(f"source={source}: cannot open camera {source}", parameter="source")
        return capture
    if Path(source).is_dir():
        raise DataError(f"{source}: a folder, not a video (photos are for --image, or Landmarker.batch)")
    if not Path(source).is_file():
        raise DataError(f"source={source}: video not found", parameter="source")
    if Path(source).stat().st_size == 0:
        raise DataError(f"{source}: an empty file, not a video")
    if is_still_photo(Path(source)):
        raise DataError(f"{source}: a photo, not a video; pass it with --image (or call the Landmarker on it)")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        raise DataError(f"{source}: cannot read video (not a video file, or truncated)")
    return capture


def is_still_photo(path: Path) -> bool:
    """Whether PIL reads the file as a picture of one frame (FFmpeg would make a one-frame video of it); an
    animated GIF or WebP stays a video."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) == 1
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def read_ahead(capture: cv2.VideoCapture, depth: int = READ_AHEAD) -> Iterator[np.ndarray]:
    """BGR frames, upright (OpenCV applies the rotation in the file's metadata), decoded by a thread of their
    own up to `depth` frames ahead of the one being looked at. Leaving the loop early stops the thread."""
    frames: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def decode() -> None:
        while not stop.is_set():
            ok, frame = capture.read()
            frames.put(frame if ok else None)
            if not ok:
                return

    thread = threading.Thread(target=decode, name="decode", daemon=True)
    thread.start()
    try:
        while (frame := frames.get()) is not None:
            yield frame
    finally:
        stop.set()
        while thread.is_alive():  # a decoder blocked on a full queue takes one more frame and sees the stop
            try:
                frames.get(timeout=0.05)
            except queue.Empty:
                pass


@dataclass(frozen=True)
class VideoFrame:
    """One frame's result, as Landmarker.video yields it and run_video writes it."""
    index: int
    time: float                  # seconds: from the file's frame rate, or the camera's clock
    faces: list[TrackedFace]
    frame: np.ndarray            # the BGR picture as OpenCV decoded it

    def to_dict(self) -> dict:
        return {"frame": self.index, "time": round(self.time, 4), "faces": [tracked_record(f) for f in self.faces]}


@dataclass(frozen=True)
class Opened:
    """A video opened for tracking: what its header says, and its frames."""
    name: str
    fps: float
    expected: int                # frames the header promises; 0 for a camera
    size: tuple[int, int]        # width, height of its first frame
    frames: Iterator[np.ndarray]
    reader: Iterator[np.ndarray]  # read_ahead's generator, which `frames` continues
    capture: cv2.VideoCapture

    def close(self) -> None:
        """The reading thread stopped and the file or camera let go, however far the frames were taken."""
        self.frames.close()
        self.reader.close()
        self.capture.release()


def open_frames(source: str) -> Opened:
    """A file or camera N opened, its first frame decoded (DataError where there is none), and its frames
    read ahead."""
    capture = open_video(source)
    camera = source.isdigit()
    fps = capture.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else 30.0  # some cameras and containers report 0
    expected = 0 if camera else int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    reader = read_ahead(capture)
    first = next(reader, None)
    if first is None:
        reader.close()
        capture.release()
        raise DataError(f"{source}: cannot read video (no frame could be decoded)")
    name = f"camera{source}" if camera else Path(source).stem

    def all_frames() -> Iterator[np.ndarray]:
        yield first
        yield from reader

    return Opened(name, fps, expected, (first.shape[1], first.shape[0]), all_frames(), reader, capture)


def track_frames(opened: Opened, tracker: FaceTracker, camera: bool) -> Iterator[VideoFrame]:
    """Each frame's faces, tracked: gray once per frame for the network, the BGR frame for the detector."""
    tracker.reset()
    start = time.perf_counter()
    width, height = opened.size
    for i, frame in enumerate(opened.frames):
        t = time.perf_counter() - start if camera else i / opened.fps
        if frame.shape[:2] != (height, width):  # a camera that changes resolution mid-stream
            frame = cv2.resize(frame, (width, height))
        gray = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
        yield VideoFrame(i, t, tracker.update(gray, t, frame), frame)


def track(source: str, tracker: FaceTracker) -> Iterator[VideoFrame]:
    """Landmarker.video's door: every frame of a file or camera with its tracked faces; nothing written. The
    capture is released when the iterator ends or is dropped."""
    opened = open_frames(source)
    try:
        yield from track_frames(opened, tracker, source.isdigit())
    finally:
        opened.close()


def draw_faces(frame: np.ndarray, faces: list[TrackedFace]) -> None:
    """As predict.py draws photos: crops yellow (turned by the face's roll), points red, and each face's id."""
    for face in faces:
        box = face.box
        thick = max(1, round(box.side / 150))
        corners = cv2.boxPoints((tuple(map(float, box.center)), (box.width, box.height), face.roll))
        cv2.polylines(frame, [np.round(corners).astype(np.int32)], True, (0, 220, 255), thick)
        top_left = corners[np.argmin(corners.sum(1))]
        cv2.putText(frame, str(face.id), (round(top_left[0]), round(top_left[1]) - 4), cv2.FONT_HERSHEY_SIMPLEX,
                    max(0.4, box.side / 250), (0, 220, 255), thick)
        radius = round(max(1.5, box.side / 90) * 16)
        for x, y in np.round(face.points * 16).astype(int).tolist():  # 4 fractional bits: points sit between pixels
            cv2.circle(frame, (x, y), radius, (40, 40, 255), -1, cv2.LINE_AA, 4)


def even(frame: np.ndarray) -> np.ndarray:
    """mp4v drops an odd last row or column: pad one black line instead, so no pixel is lost."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return cv2.copyMakeBorder(frame, 0, h % 2, 0, w % 2, cv2.BORDER_CONSTANT)


def tracked_record(face: TrackedFace) -> dict:
    return {"id": face.id, **face_fields(face.box, face.points, face.scores, face.pose),
            "roll": round(float(face.roll), 1), "detected": face.detected}


class LiveView:
    """The annotated frames in a matplotlib window (opencv-python-headless has none); closing it stops."""

    def __init__(self, title: str):
        import matplotlib.pyplot as plt
        self.plt = plt
        plt.ion()
        self.figure, ax = plt.subplots(num=title)
        ax.axis("off")
        self.image = None

    def show(self, frame: np.ndarray) -> bool:
        """False once the window is closed."""
        if not self.plt.fignum_exists(self.figure.number):
            return False
        rgb = frame[..., ::-1]
        if self.image is None:
            self.image = self.figure.axes[0].imshow(rgb)
        else:
            self.image.set_data(rgb)
        self.plt.pause(0.001)
        return True


@dataclass
class VideoRun:
    results: Path         # the JSON Lines file: a header line, then one line per frame (read_video_results)
    frames: int           # frames done
    faces: int            # distinct face ids tracked
    detector_runs: int
    seconds: float        # wall clock from the first frame read to the files written
    interrupted: bool
    missing: int          # frames the file's header promised but that could not be read
    spent: dict = None    # seconds by step: the main thread's (decoding waited for, tracking, waiting for the
                          # writer) and the writer thread's (JSON, drawing, encoding), which overlap


def read_video_results(path: Path) -> dict:
    """A video's JSON Lines file as one dict: its header's keys, and "frames", the list of frame records
    (a line torn by a crash, the last, is left out)."""
    records, _ = read_json_lines(path)
    if not records:
        raise DataError(f"{path}: not a video's results (no header line)")
    return {**records[0], "frames": records[1:]}


class FrameWriter:
    """Each frame's JSON line, drawing and MP4 encoding on a thread of its own, in order, up to WRITE_BEHIND
    frames behind the network: the line is written and flushed as it comes (a crash keeps every frame written),
    the drawn frame encoded unless there is no MP4 to write. Seconds spent in each step are kept."""

    def __init__(self, lines, mp4: cv2.VideoWriter | None, view: "LiveView | None"):
        self.lines, self.mp4, self.view = lines, mp4, view
        self.spent = {"json": 0.0, "draw": 0.0, "encode": 0.0}
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(WRITE_BEHIND)
        self.thread = None if view else threading.Thread(target=self.work, name="write", daemon=True)
        if self.thread:
            self.thread.start()

    def put(self, result: VideoFrame) -> bool:
        """Hand one frame over; False once the live window was closed. Raises what the thread met (a full disk)."""
        if self.error is not None:
            raise self.error
        if self.thread is None:  # a live window: matplotlib draws on the main thread only
            self.write(result)
            return self.view.show(result.frame)
        self.queue.put(result)
        return True

    def work(self) -> None:
        while (result := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(result)
                except BaseException as e:  # said by the main thread at its next frame
                    self.error = e

    def write(self, result: VideoFrame) -> None:
        start = time.perf_counter()
        try:
            self.lines.write(json.dumps(result.to_dict()) + "\n")
            self.lines.flush()
        except OSError as e:
            raise OutputError(f"{Path(self.lines.name).parent}: cannot write {Path(self.lines.name).name} "
                              f"({e.strerror or e}); the frames before are kept") from None
        middle = time.perf_counter()
        self.spent["json"] += middle - start
        if self.mp4 is not None or self.view is not None:  # the live window shows the frames drawn too
            draw_faces(result.frame, result.faces)
        drawn = time.perf_counter()
        if self.mp4 is not None:
            self.mp4.write(even(result.frame))
        self.spent["draw"] += drawn - middle
        self.spent["encode"] += time.perf_counter() - drawn

    def close(self) -> None:
        """Every frame handed over written; raises what the thread met."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


def start_outputs(opened: Opened, video_path: Path | None, part: Path, header: dict):
    """The annotated MP4's writer (None without one) and the JSON Lines file with its header line, in a folder
    made if need be; DataError or OutputError in one line where they cannot be made."""
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        lines = open(part, "w", encoding="utf-8")
        lines.write(json.dumps(header) + "\n")
    except OSError as e:
        raise OutputError(f"{part.parent}: cannot write {part.name} ({e.strerror or e})") from None
    if video_path is None:
        return None, lines
    mp4 = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), opened.fps,
                          (opened.size[0] + opened.size[0] % 2, opened.size[1] + opened.size[1] % 2))
    if not mp4.isOpened():
        lines.close()
        part.unlink(missing_ok=True)
        raise DataError(f"{video_path}: cannot write video")
    return mp4, lines


def run_video(source: str, tracker: FaceTracker, out_dir: Path, weights: str, show: bool = False,
              draw: bool = True) -> VideoRun:
    """Landmarks on every frame of `source` (a file or a camera number): OUT/<name>.jsonl and, unless not
    `draw`, OUT/<name>_landmarks.mp4. Decoding the next frames, the network on this one, and drawing,
    encoding and writing the last ones run at the same time, on three threads. Each frame's line is written
    and flushed as it comes, so memory stays flat over any length of video and a crash keeps every frame
    written (in <name>.jsonl.part); the file takes its name when the run ends, by Ctrl-C or closing the live
    window too, replacing an earlier run's only then."""
    from tqdm import tqdm
    camera = source.isdigit()
    opened = open_frames(source)
    video_path, results = out_dir / f"{opened.name}_landmarks.mp4", out_dir / f"{opened.name}.jsonl"
    part = results.with_name(results.name + ".part")
    try:
        mp4, lines = start_outputs(opened, video_path if draw else None, part,
                                   {"weights": weights, "video": source, "fps": opened.fps, "width": opened.size[0],
                                    "height": opened.size[1]})
    except BaseException:
        opened.close()
        raise
    writer = FrameWriter(lines, mp4, LiveView(opened.name) if show else None)
    done, ids, interrupted, start = 0, set(), False, time.perf_counter()
    spent = {"decode_and_track": 0.0, "waiting_for_writer": 0.0}
    bar = tqdm(total=opened.expected or None, unit="frame", desc=opened.name, disable=None)
    try:
        frames, before = track_frames(opened, tracker, camera), time.perf_counter()
        for result in frames:
            middle = time.perf_counter()
            going = writer.put(result)
            spent["decode_and_track"] += middle - before
            before = time.perf_counter()
            spent["waiting_for_writer"] += before - middle
            done, ids = done + 1, ids | {f.id for f in result.faces}
            bar.update()
            if not going:
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        opened.close()
        try:
            writer.close()
        finally:
            lines.close()
            if mp4 is not None:
                mp4.release()
    os.replace(part, results)
    seconds = time.perf_counter() - start
    print(f"{'stopped: ' if interrupted else ''}wrote {results}" + (f" and {video_path}" if draw else "") +
          f": {done} frames ({done / seconds:.1f}/s), {len(ids)} face{'s' * (len(ids) != 1)} tracked, "
          f"detector ran on {tracker.detector_runs}")
    # Frame counts in headers can be estimates: only a clear shortfall means the file ends early.
    expected = opened.expected
    missing = expected - done if not interrupted and expected - done > max(1, expected // 100) else 0
    return VideoRun(results, done, len(ids), tracker.detector_runs, seconds, interrupted, missing,
                    spent | writer.spent)
