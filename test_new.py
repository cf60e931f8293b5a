"""New tests of this session, to be merged into test_all.py by module."""
import errno
import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import evaluate
import images
import landmarks
import network_cache
import photos
import predict
import teacher
import train
import training
import video
from errors import DataError, Error, OutputError, UsageError
from faces import Landmarker
from landmarks import IBUG, NUM_LANDMARKS, Box, Face, nme, region_errors
from test_all import FAST, HERE, astronaut_jpg, demo, own_network_cache, run_script, trained  # noqa: F401

RELEASED = pytest.mark.skipif(not checkpoints.RELEASED_WEIGHTS.is_file(), reason="no released weights")


def astronaut() -> np.ndarray:
    from skimage.data import astronaut as photo
    return photo()


@pytest.fixture(scope="module")
def released() -> Landmarker:
    return Landmarker()


# ---------------------------------------------------------------- landmarks: regions

def jaw_shape() -> np.ndarray:
    """A face whose jaw runs straight along x (so along the outline is x, across it y)."""
    points = np.random.default_rng(0).uniform(0, 100, (NUM_LANDMARKS, 2))
    points[:17] = np.stack([np.arange(17) * 5.0, np.full(17, 80.0)], 1)
    points[36], points[45] = (20, 30), (70, 30)  # the eye corners 50 apart
    return points


def test_region_nme_splits_a_jaw_error_along_and_across_its_outline():
    truth = jaw_shape()[None]
    along = truth.copy()
    along[:, :17, 0] += 2.5  # 5% of the eye-corner distance, along the jaw
    r = region_errors(along, truth)
    assert r["jaw"][0] == pytest.approx(5.0) and r["jaw_along"][0] == pytest.approx(5.0)
    assert r["jaw_across"][0] == pytest.approx(0.0, abs=1e-9) and r["mouth"][0] == 0 and r["eyes"][0] == 0
    across = truth.copy()
    across[:, :17, 1] += 2.5
    r = region_errors(across, truth)
    assert r["jaw_across"][0] == pytest.approx(5.0) and r["jaw_along"][0] == pytest.approx(0.0, abs=1e-9)
    # The regions' NME, weighted by their point counts, is the whole face's.
    r = region_errors(truth + np.random.default_rng(1).normal(0, 2, truth.shape), truth)
    sizes = {name: len(list(points)) for name, points in landmarks.IBUG_REGIONS.items()}
    whole = nme(truth + np.random.default_rng(1).normal(0, 2, truth.shape), truth)[0]
    assert sum(r[k][0] * n for k, n in sizes.items()) / NUM_LANDMARKS == pytest.approx(whole)


def test_markups_without_regions_have_none_and_wflw_has_its_own():
    assert landmarks.regions_of(landmarks.markup_for(5)) is None
    assert region_errors(np.zeros((1, 5, 2)), np.ones((1, 5, 2)), landmarks.markup_for(5), [1.0]) is None
    regions, _ = landmarks.regions_of(landmarks.WFLW)
    assert sorted(i for r in regions.values() for i in r) == list(range(98))
    assert sorted(i for r in landmarks.IBUG_REGIONS.values() for i in r) == list(range(68))


def test_evaluate_reports_each_region_in_its_table_and_json(demo, trained, tmp_path, capsys):
    out = tmp_path / "eval.json"
    evaluate.main(evaluate.parse_args(["--weights", str(trained / "best.pt"), "--data-dir", str(demo), "--xml",
                                       "labels_ibug_300W_train.xml", "--split", "val", "--workers", "0",
                                       "--out-dir", str(tmp_path), "--json", str(out)]))
    row = json.loads(out.read_text())["Full"]
    assert set(row["regions"]) == {"jaw", "brows", "nose", "eyes", "mouth", "jaw_across", "jaw_along",
                                   "brows_across", "brows_along"}
    assert min(row["regions"].values()) > 0
    assert "by region" in capsys.readouterr().out


# ---------------------------------------------------------------- training: the outline loss, the teacher's share

def test_the_along_weight_spares_an_error_along_the_outline_and_is_plain_l1_at_one():
    points = torch.from_numpy(jaw_shape()).float()[None] / 100 - 0.5
    outline = landmarks.outline_chords(IBUG)
    error = torch.zeros(1, NUM_LANDMARKS, 2)
    error[0, 5, 0] = 0.1  # along the jaw
    plain = training.anisotropic_l1(error, *training.point_frames(points, outline, 1.0))
    spared = training.anisotropic_l1(error, *training.point_frames(points, outline, 0.25))
    assert plain.item() == pytest.approx(torch.nn.functional.l1_loss(error, torch.zeros_like(error)).item())
    assert spared.item() == pytest.approx(plain.item() / 4)
    error = torch.zeros(1, NUM_LANDMARKS, 2)
    error[0, 5, 1] = 0.1  # across the jaw: weighed in full
    assert training.anisotropic_l1(error, *training.point_frames(points, outline, 0.25)).item() == \
        pytest.approx(plain.item())


def test_the_mixed_sampler_keeps_an_epochs_length_takes_its_share_and_repeats_for_a_seed():
    g = torch.Generator()
    sampler = training.MixedSampler(100, 400, 0.3, g)
    g.manual_seed(5)
    first = list(sampler)
    g.manual_seed(5)
    assert list(sampler) == first and len(first) == len(sampler) == 100
    assert sum(i >= 100 for i in first) == 30 and len(set(first)) == 100
    few = training.MixedSampler(100, 10, 0.5, g)  # fewer taught faces than their share: drawn again
    assert sum(i >= 100 for i in few) == 50 and all(i < 110 for i in few)
    g.manual_seed(5)
    ranks = [list(training.MixedSampler(100, 400, 0.3, g.manual_seed(5), r, 2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(first)


@pytest.mark.parametrize("args, problem", [
    (["--unlabelled-share", "0.3"], "--unlabelled-share: goes with --unlabelled"),
    (["--teacher", "w.pt"], "--teacher: goes with --unlabelled"),
    (["--along-weight", "0.5"], "--along-weight: weighs the pip head's offsets"),
])
def test_teacher_and_outline_flags_that_would_do_nothing_are_refused(args, problem, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(args)
    assert problem in capsys.readouterr().err


# ---------------------------------------------------------------- the teacher

def taught_record(path: Path, ours: np.ndarray, theirs: np.ndarray | None, score: float = 0.9) -> dict:
    return {"stamp": teacher.photo_stamp(path),
            "faces": [{"ours": ours.tolist(), "dlib": None if theirs is None else theirs.tolist(), "score": score}]}


def test_the_teacher_keeps_only_faces_its_members_agree_on_outside_the_labelled_and_validation_ones(tmp_path):
    shape = jaw_shape() * 2 + 50  # a face about 200 px across
    names = ["other.jpg", "val.jpg", "labelled.jpg", "small.jpg", "unsure.jpg", "apart.jpg"]
    for name in names:
        Image.new("L", (500, 500)).save(tmp_path / name)
    files = [tmp_path / n for n in names]
    records = {str(f.resolve()): taught_record(f, shape, shape + 1.0) for f in files}
    records[str(files[3].resolve())] = taught_record(files[3], shape / 8, shape / 8)  # 25 px: small
    records[str(files[4].resolve())] = taught_record(files[4], shape, shape, score=0.3)
    records[str(files[5].resolve())] = taught_record(files[5], shape, shape + 20.0)  # 40% apart
    labelled = [Face(files[2], landmarks.box_from_points(shape), shape), Face(files[1], Box(0, 0, 9, 9), shape)]
    kept, dropped = teacher.taught_faces(records, files, labelled, held_out={files[1].resolve()})
    assert [k.image.name for k in kept] == ["other.jpg"]
    np.testing.assert_allclose(kept[0].points, shape + 0.5)  # the members' mean
    assert dropped == {"validation photo": 1, "labelled already": 1, "small": 1, "unsure": 1, "disagree": 1}


@RELEASED
def test_the_teachers_labels_are_kept_photo_by_photo_and_a_torn_record_is_labelled_again(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(astronaut()).save(folder / name)
    t = teacher.Teacher(checkpoints.RELEASED_WEIGHTS)
    cache = tmp_path / "cache"
    files = photos.photo_files([str(folder)]).files
    records = teacher.label_photos(t, files, cache, show=False)
    [face] = records[str(files[0].resolve())]["faces"]
    assert np.array(face["ours"]).shape == (NUM_LANDMARKS, 2) and face["score"] > 0.7
    path = teacher.records_path(cache, t.key)
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # a crash in the middle of the second line
    labelled = []
    t.label = lambda p: labelled.append(p.name) or teacher.Teacher.label(t, p)
    teacher.label_photos(t, files, cache, show=False)
    assert labelled == ["b.jpg"] and path.read_bytes() == whole


@RELEASED
def test_training_with_unlabelled_photos_takes_the_teachers_faces_at_their_share(demo, tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    Image.fromarray(astronaut()).save(folder / "astronaut.jpg")
    Image.new("RGB", (64, 64), "gray").save(folder / "wall.png")
    out = tmp_path / "run"
    args = train.parse_args(["--data-dir", str(demo), "--epochs", "1", "--out", str(out), "--unlabelled",
                             str(folder), "--unlabelled-share", "0.5", "--head", "pip", *FAST])
    train_loader, _, _, _ = training.make_loaders(args, 0, 1)
    assert isinstance(train_loader.dataset, training.WithTaught) and len(train_loader.dataset.taught) == 1
    taught_image, taught_target = train_loader.dataset.taught[0]
    assert taught_image.shape == (1, 64, 64) and taught_target.shape[0] >= 2 * NUM_LANDMARKS
    drawn = list(train_loader.sampler)
    labelled = len(train_loader.dataset.indices)
    assert len(drawn) == labelled and sum(i >= labelled for i in drawn) == round(labelled * 0.5)
    history = train.main(args)
    assert len(history) == 1 and "teacher: 1 faces kept from 2 photos" in capsys.readouterr().out
    assert train.load_checkpoint(out / "last.pt")["config"]["unlabelled"] == [str(folder)]


def test_unlabelled_folders_that_are_not_there_stop_with_one_line(demo, tmp_path):
    result = run_script("train.py", "--data-dir", str(demo), "--epochs", "1", "--out", str(tmp_path / "r"),
                        "--unlabelled", str(tmp_path / "nowhere"), *FAST)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"--unlabelled {tmp_path / 'nowhere'}: no such folder or photo"]


# ---------------------------------------------------------------- the Landmarker: flip, crowds, what users pass

@RELEASED
def test_flip_averages_each_face_with_its_mirror_image(released):
    photo = astronaut()
    one = released(photo)[0]
    flipped = Landmarker(flip=True)(photo)[0]
    mirrored = released(np.ascontiguousarray(photo[:, ::-1]))[0]
    unmirrored = mirrored.points[list(IBUG.flip)] * [-1, 1] + [photo.shape[1] - 1, 0]
    assert np.abs(flipped.points - one.points).max() < 3
    # Not the plain look: its points move towards the mirror look's, as the average of the two does.
    assert np.abs(flipped.points - (one.points + unmirrored) / 2).mean() < np.abs(one.points - unmirrored).mean() / 2


@RELEASED
def test_a_crowd_of_dozens_of_faces_is_found_whole_in_a_few_network_calls(released, monkeypatch):
    tile = np.asarray(Image.fromarray(astronaut()[20:260, 120:340]).resize((120, 120)))
    crowd = np.concatenate([np.concatenate([tile] * 9, 1)] * 9, 0)  # 81 faces
    calls = []
    real = released.model.with_scores

    def counted(batch):
        calls.append(len(batch))
        return real(batch)

    monkeypatch.setattr(released.model, "with_scores", counted)
    faces = released(crowd)
    assert len(faces) == 81 and calls == [64, 17]
    centres = sorted((round(f.box.center[1] / 120), round(f.box.center[0] / 120)) for f in faces)
    assert len(set(centres)) == 81  # one face in each tile


@RELEASED
@pytest.mark.parametrize("name", ["rgba", "gray_alpha", "gray", "gray_h_w_1", "float01", "float255", "uint16",
                                  "channels_first", "bgr_view_turned_back", "every_other_pixel", "tensor"])
def test_the_python_api_takes_what_numpy_pil_and_opencv_users_pass(name, released):
    photo = astronaut()
    gray = np.asarray(Image.fromarray(photo).convert("L"))
    given = {"rgba": np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)]),
             "gray_alpha": np.dstack([gray, np.full(gray.shape, 255, np.uint8)]), "gray": gray,
             "gray_h_w_1": gray[..., None], "float01": photo / 255.0, "float255": photo.astype(np.float32),
             "uint16": photo.astype(np.uint16) * 257, "channels_first": np.moveaxis(photo, -1, 0),
             "bgr_view_turned_back": photo[..., ::-1][..., ::-1], "every_other_pixel": photo[::2, ::2],
             "tensor": torch.from_numpy(np.moveaxis(photo, -1, 0) / 255.0)}[name]
    scale = 0.5 if name == "every_other_pixel" else 1.0
    [face] = released(given)
    assert np.abs(face.points - released(photo)[0].points * scale).max() < 3


@pytest.mark.parametrize("given, said", [
    (np.zeros((0, 0, 3), np.uint8), "an empty picture"),
    (np.zeros((10, 10, 5), np.uint8), "shape (10, 10, 5)"),
    (np.full((10, 10), np.nan), "NaN"),
    (np.full((10, 10), -3.0), "values from -3.0"),
    (np.array([["a"]]), "dtype <U1"),
    (np.zeros(7), "shape (7,)"),
    ("no/such/photo.jpg", "image not found"),
    ([1, 2, 3], "image=list: expected a path"),
    (Image.new("RGB", (0, 0)), "an empty picture"),
])
def test_what_the_python_api_cannot_take_is_the_projects_own_error_naming_it(given, said):
    with pytest.raises(Error, match=said.replace("(", r"\(").replace(")", r"\)")) as caught:
        Landmarker()(given)
    assert "expected" in str(caught.value) or "not found" in str(caught.value) or "empty" in str(caught.value)


@RELEASED
@pytest.mark.parametrize("kind", ["webp", "animated_gif", "cmyk_jpg", "palette_png", "gray_alpha_png",
                                  "gray16_png", "rgb16_png", "one_pixel", "three_pixels"])
def test_photos_in_less_common_forms_give_their_faces_or_an_empty_record(kind, tmp_path, released):
    import cv2
    photo = Image.fromarray(astronaut())
    path = tmp_path / {"webp": "p.webp", "animated_gif": "p.gif", "cmyk_jpg": "p.jpg"}.get(kind, "p.png")
    if kind == "webp":
        photo.save(path)
    elif kind == "animated_gif":  # the first frame holds the face
        photo.save(path, save_all=True, append_images=[Image.new("RGB", photo.size, "white")], duration=100)
    elif kind == "cmyk_jpg":
        photo.convert("CMYK").save(path)
    elif kind == "palette_png":
        photo.convert("P").save(path)
    elif kind == "gray_alpha_png":
        photo.convert("LA").save(path)
    elif kind == "gray16_png":
        Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257).save(path)
    elif kind == "rgb16_png":
        cv2.imwrite(str(path), np.asarray(photo)[..., ::-1].astype(np.uint16) * 257)
    else:
        Image.new("RGB", (1, 1) if kind == "one_pixel" else (3, 1)).save(path)
    faces = released(path)
    if kind in ("one_pixel", "three_pixels"):
        assert faces == []
    else:
        assert len(faces) == 1 and np.abs(faces[0].points - released(photo)[0].points).max() < 3


# ---------------------------------------------------------------- photos: links, a full disk, streaming

def test_recursive_folders_take_linked_photos_but_not_linked_folders_loops_or_broken_links(tmp_path):
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for path in (tree / "top.png", tree / "a" / "b" / "deep.png", outside / "far.png"):
        Image.new("L", (8, 8)).save(path)
    (tree / "a" / "b" / "up").symlink_to(tree)  # a loop
    (tree / "a" / "out").symlink_to(outside)    # a folder out of the tree
    (tree / "a" / "far.png").symlink_to(outside / "far.png")  # a photo linked in from outside
    (tree / "a" / "gone.png").symlink_to(tmp_path / "nothing.png")
    (tree / "a" / "x.png").symlink_to(tree / "a" / "y.png")
    (tree / "a" / "y.png").symlink_to(tree / "a" / "x.png")
    found = photos.photo_files([str(tree)], recursive=True)
    assert [str(p.relative_to(tree)) for p in found.files] == ["a/b/deep.png", "a/far.png", "top.png"]
    assert found.skipped == {"linked folder": 2, "broken or looping link": 3}


def test_a_disk_that_fills_up_stops_the_run_with_one_line_no_torn_line_and_resume_finishes(trained, tmp_path,
                                                                                           monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (90, 90), 40 * i).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    real_write, lines = os.write, []

    def full_after_two(fd, data):
        if len(lines) == 2:
            real_write(fd, data[:7])  # part of the line reaches the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        lines.append(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_after_two)
    args = ["--weights", str(trained / "best.pt"), "--out-dir", str(out), "--image", str(folder), "--box",
            "5,5,80,80", "--workers", "1", "--no-draw"]
    with pytest.raises(SystemExit) as stop:
        predict.main(predict.parse_args(args))
    assert str(stop.value).startswith(f"{out}: cannot write predictions.jsonl (No space left on device)")
    assert "--resume" in str(stop.value)
    text = (out / photos.RESULTS).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 2
    monkeypatch.setattr(os, "write", real_write)
    predict.main(predict.parse_args([*args, "--resume"]))
    saved = photos.read_results(out / photos.RESULTS)
    assert sorted(Path(r["image"]).name for r in saved["images"]) == [f"p{i}.png" for i in range(4)]


def test_a_disk_full_while_drawing_names_the_folder_from_the_worker_pool(trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (90, 90), 40 * i).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "p1_landmarks.png").mkdir()  # a folder in the PNG's place: its write fails as a full disk's would
    result = run_script("predict.py", "--weights", str(trained / "best.pt"), "--out-dir", str(out), "--image",
                        str(folder), "--box", "5,5,80,80", "--workers", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{out}: cannot write p1_landmarks.png")


def test_results_stream_out_photo_by_photo_as_they_are_done(trained, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("L", (90, 90), 40 * i).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    seen = []
    real = predict.report_photo

    def report(record, args):
        seen.append(len((out / photos.RESULTS).read_text().splitlines()))
        real(record, args)

    monkeypatch.setattr(predict, "report_photo", report)
    predict.main(predict.parse_args(["--weights", str(trained / "best.pt"), "--out-dir", str(out), "--image",
                                     str(folder), "--box", "5,5,80,80", "--no-draw", "--workers", "2"]))
    assert seen == [1, 2, 3, 4, 5]


def test_a_runs_tally_holds_counts_not_records():
    tally = photos.Tally()
    for i in range(1000):
        tally.add({"image": f"{i}.jpg", "faces": [{"points": [[0, 0]] * 68}] * (i % 3)}, {"detect": 0.001})
    assert vars(tally).keys() == {"images", "faces", "unreadable", "spent"}
    summary = tally.summary(2.0)
    assert summary["images"] == 1000 and summary["faces"] == 999 and summary["seconds_by_step"] == {"detect": 1.0}


# ---------------------------------------------------------------- video sources that are not what they seem

@pytest.mark.parametrize("kind, said", [
    ("photo", "a photo, not a video; pass it with --image"),
    ("text", "cannot read video (not a video file, or truncated)"),
    ("empty", "an empty file, not a video"),
    ("camera", "cannot open camera 9"),
])
def test_a_video_source_that_is_not_a_video_says_so_in_one_line_and_seconds(kind, said, tmp_path):
    source = {"photo": tmp_path / "p.jpg", "text": tmp_path / "t.mp4", "empty": tmp_path / "e.mp4"}.get(kind)
    if kind == "photo":
        Image.new("RGB", (64, 64)).save(source)
    elif kind == "text":
        source.write_text("hello")
    elif kind == "empty":
        source.write_bytes(b"")
    started = time.perf_counter()
    with pytest.raises(DataError, match=said.replace("(", r"\(").replace(")", r"\)")):
        video.open_video(str(source) if source else "9")
    assert time.perf_counter() - started < 5


# ---------------------------------------------------------------- torch.hub beside the user's own modules

@RELEASED
def test_torch_hub_loads_beside_the_users_own_model_errors_transforms_and_dataset(tmp_path):
    for name in ("model", "errors", "transforms", "dataset"):
        (tmp_path / f"{name}.py").write_text(f"MINE = {name!r}\n")
    astronaut_jpg(tmp_path)
    script = ("import model, errors, sys, torch\n"
              f"found = torch.hub.load({str(HERE)!r}, 'landmarker', source='local')('astronaut.jpg')\n"
              "import transforms, dataset\n"
              "print(len(found), model.MINE, errors.MINE, transforms.MINE, dataset.MINE,"
              " 'faces' in sys.modules, 'landmarks' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "model", "errors", "transforms", "dataset", "False", "False"]


# ---------------------------------------------------------------- the network cache

@RELEASED
@pytest.mark.parametrize("where", ["a_file", "under_a_file", "proc"])
def test_a_network_cache_that_cannot_be_made_costs_only_time(where, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file, not a folder")
    cache = {"a_file": tmp_path / "file", "under_a_file": tmp_path / "file" / "cache", "proc": Path("/proc/nope")}
    monkeypatch.setenv(network_cache.CACHE_ENV, str(cache[where]))
    [face] = Landmarker(int8=False)(astronaut())
    assert face.points.shape == (NUM_LANDMARKS, 2)


@RELEASED
def test_garbled_cache_entries_are_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv(network_cache.CACHE_ENV, str(tmp_path))
    first = Landmarker()(astronaut())[0].points
    entries = list(tmp_path.iterdir())
    assert entries
    for entry in entries:
        entry.write_bytes(os.urandom(4096))
    assert np.abs(Landmarker()(astronaut())[0].points - first).max() < 1e-3


@RELEASED
def test_runs_started_together_on_an_empty_cache_all_finish_and_leave_one_whole_entry(tmp_path):
    photo = astronaut_jpg(tmp_path)
    env = {**os.environ, network_cache.CACHE_ENV: str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "predict.py", "--image", str(photo), "--no-draw", "--out-dir",
                              str(tmp_path / f"out{i}")], cwd=HERE, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(3)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()
    assert [len(photos.read_results(tmp_path / f"out{i}" / photos.RESULTS)["images"]) for i in range(3)] == [1] * 3
    kept = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(kept) == 1


# ---------------------------------------------------------------- the Landmarker's doors: options, detectors, batches, video

@RELEASED
def test_your_own_detector_finds_the_face_in_its_box_as_close_as_yunets_points(released):
    photo = astronaut()
    yunet = released(photo)[0]
    box = [float(v) for v in released.detect(photo)[0].own_box]  # YuNet's own box, not mapped to dlib's

    def my_detector(rgb: np.ndarray):
        assert rgb.shape == photo.shape and rgb.dtype == np.uint8
        return [(*box, 0.99)]

    [face] = Landmarker(detector=my_detector)(photo)
    assert np.abs(face.points - yunet.points).max() < 3 and face.detector_score == pytest.approx(0.99)


@pytest.mark.parametrize("returned, said", [("nonsense", "returned 'nonsense'"), ([(1, 2, 3)], "expected (left, top"),
                                            ([(0, 0, -5, 10)], "of positive size")])
def test_a_detector_that_returns_no_boxes_is_named_with_what_it_gave(returned, said):
    def odd(rgb):
        return returned

    with pytest.raises(UsageError, match=re.escape(said)) as caught:
        Landmarker(detector=odd)(np.zeros((64, 64, 3), np.uint8))
    assert str(caught.value).startswith("detector=odd:")


@RELEASED
def test_max_faces_keeps_the_surest_of_two_and_min_score_drops_the_unsure():
    photo = astronaut()
    smaller = np.pad(photo[::2, ::2], ((0, 256), (0, 0), (0, 0)))  # the same face at half the size, beside it
    pair = np.concatenate([photo, smaller], 1)
    both = Landmarker()(pair)
    assert len(both) == 2
    [one] = Landmarker(max_faces=1)(pair)
    assert one.detector_score == max(f.detector_score for f in both)
    assert Landmarker(min_score=0.9999)(pair) == []


@pytest.mark.parametrize("options, said", [
    (dict(detector="mtcnn"), "detector='mtcnn': expected one of yunet, hog"),
    (dict(detector="hog", any_roll=True), "any_roll=True: goes with detector=\"yunet\""),
    (dict(passes=0), "passes=0: expected 1 to 4"),
    (dict(max_faces=0), "max_faces=0"),
    (dict(detector="hog", min_score=0.5), "min_score=0.5"),
    (dict(dtype="int4"), "dtype='int4'"),
])
def test_options_a_landmarker_cannot_take_are_refused_naming_the_parameter(options, said):
    from faces import LandmarkerOptions
    with pytest.raises(UsageError, match=re.escape(said)):
        LandmarkerOptions(**options)


def test_library_errors_name_parameters_and_scripts_name_their_flags():
    box_error = UsageError("box=1,2,3,4: lies wholly outside the 10x10 photo", "box")
    assert box_error.for_flags() == "--box 1,2,3,4: lies wholly outside the 10x10 photo"
    video_error = DataError("source=9: cannot open camera 9", parameter="source")
    assert video_error.for_flags({"source": "--video"}) == "--video 9: cannot open camera 9"
    import pickle
    again = pickle.loads(pickle.dumps(DataError("x.jpg: cannot read", "unreadable image", "image")))
    assert (again.reason, again.parameter, str(again)) == ("unreadable image", "image", "x.jpg: cannot read")
    with pytest.raises(UsageError, match=re.escape("device=nonsense: not a device name")):
        Landmarker(device="nonsense")


@RELEASED
def test_a_batch_gives_the_one_by_one_points_and_shares_the_network_calls(released, tmp_path, monkeypatch):
    photo = astronaut()
    pictures = [np.ascontiguousarray(np.roll(photo, 12 * i, axis=1)) for i in range(8)]
    alone = [released(p) for p in pictures]
    calls = []
    real = released.model.with_scores
    monkeypatch.setattr(released.model, "with_scores", lambda batch: calls.append(len(batch)) or real(batch))
    together = released.batch(pictures)
    assert calls == [8]
    for one, many in zip(alone, together):
        assert len(one) == len(many) == 1 and np.abs(one[0].points - many[0].points).max() < 0.5


@RELEASED
def test_a_batch_names_the_picture_it_cannot_read(released):
    with pytest.raises(DataError, match="picture 1: no/such.jpg: image not found"):
        released.batch([astronaut(), "no/such.jpg"])


@RELEASED
def test_video_from_python_yields_one_tracked_result_per_frame(released, tmp_path):
    import cv2
    path = tmp_path / "clip.mp4"
    frame = cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (512, 512))
    for i in range(12):
        writer.write(np.roll(frame, 2 * i, axis=1))
    writer.release()
    results = list(released.video(path))
    assert [r.index for r in results] == list(range(12)) and results[3].time == pytest.approx(0.3)
    assert all(len(r.faces) == 1 and r.faces[0].id == 0 for r in results)
    assert results[0].frame.shape == (512, 512, 3)


@RELEASED
def test_with_options_shares_the_network_and_refuses_to_change_it(released):
    other = released.with_options(passes=2, max_faces=1)
    assert other.model is released.model and other.options.passes == 2 and released.options.passes is None
    with pytest.raises(UsageError, match="int8=False: set when the network is built"):
        released.with_options(int8=False)


def test_a_detection_whose_points_the_network_is_unsure_of_is_no_face_new_or_taken_up():
    from test_all import FakeFaces
    real, phantom = Box(100, 100, 80, 80), Box(400, 300, 20, 20)
    scene = FakeFaces({"real": real})

    def detect(picture):
        return scene.detect(picture) + [video.Detection(phantom, 0.7)]

    def locate(gray, crops):  # the network's scores: sure on the face, 0.24 on YuNet's 20 px false face
        points, _, _ = scene.locate(gray, crops)
        scores = np.array([[0.24 if landmarks.box_iou(c.box, phantom) > 0.3 else 0.9] * 68 for c in crops])
        return points, None, scores

    tracker = video.FaceTracker(locate, detect, detect_every=2)
    gray = Image.new("L", (640, 480))
    for t in range(4):
        faces = tracker.update(gray, t / 30)
        assert [f.box.side > 40 for f in faces] == [True]
