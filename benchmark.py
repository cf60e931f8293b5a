"""Speed figures for the machine it runs on: data loading, training (the model alone and end to end) and inference, at several input sizes."""
import argparse
import copy
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

import dlib_baseline
from checkpoints import RELEASED_WEIGHTS
from dataset import FaceLandmarksDataset
from detectors import HOG_UPSAMPLE, detect_faces, load_hog, make_detector
from faces import Landmarker, LandmarkerOptions
from errors import UsageError
from files import write_atomic
from flags import WORKERS_MAX, number_in, one_line_errors, out_file
from images import open_gray, read_photo, to_gray
from labels import TRAIN_XML
from landmarks import NUM_LANDMARKS
from model import FEATURES, HEADS, MAX_IMG_SIZE, MIN_IMG_SIZE, build_model, features_misfit
from onnx_io import export_onnx, onnx_runner
from photos import PhotoSettings, drawn_names, landmark_photos, photo_files
from quantized import int8_runner, int8_supported, quantize_body, to_calibration
from recipes import resolve
from runtime import (inference_autocast, optimize_for_inference, pick_device, pip_head_of,
                     resolve_amp)
from training import make_loaders, make_loss, make_optimizer, make_scaler, make_scheduler, seed_everything, train_one_epoch

# The batch the throughput figure `infer_bs64_img_s` is named for, whatever --batch-size says.
INFER_BATCH = 64
# Untimed calls before a batch-1 latency is measured: TorchScript fuses only after its first calls.
LATENCY_WARMUP = 3
# Faces dlib's shape predictor is timed on, one at a time, as the network is at batch 1.
DLIB_FACES = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="../shared/data/300w_subset",
                   help="folder holding dlib's XML and images (default: ../shared/data/300w_subset)")
    p.add_argument("--xml", default=TRAIN_XML, help=f"labels file inside --data-dir (default: {TRAIN_XML})")
    p.add_argument("--img-sizes", type=number_in(int, MIN_IMG_SIZE, MAX_IMG_SIZE), nargs="+",
                   default=[224, 128, 160], metavar="N",
                   help="network input sides to measure (default: 224 128 160)")
    p.add_argument("--batch-size", type=number_in(int, 1), default=64, help="loader and training batch (default: 64)")
    p.add_argument("--workers", type=number_in(int, 0, WORKERS_MAX), nargs="+", default=[0, 1, 2], metavar="N",
                   help="loader processes to measure the loader with; end to end uses the largest (default: 0 1 2)")
    p.add_argument("--batches", type=number_in(int, 1), default=10, help="batches timed for each figure (default: 10)")
    p.add_argument("--warmup", type=number_in(int, 0), default=2,
                   help="untimed batches before each figure (default: 2)")
    p.add_argument("--runs", type=number_in(int, 1), default=30,
                   help="batch-1 inferences timed; the median is shown (default: 30)")
    p.add_argument("--head", choices=list(HEADS), default="regression",
                   help="the network's head, as train.py --head (default: regression)")
    p.add_argument("--features", choices=list(FEATURES), default="stride32",
                   help="what the pip head reads, as train.py --features (default: stride32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto: cuda when present (default: auto)")
    p.add_argument("--json", metavar="FILE", type=out_file, help="also write the figures to FILE as JSON")
    p.add_argument("--photos", nargs="+", metavar="PATH",
                   help="instead, time whole photos (files, or folders walked recursively): each detector, dlib's "
                        "pipeline (HOG, then its 68-point model) and predict.py --no-draw, on the same photos")
    p.add_argument("--photo-count", type=number_in(int, 1), default=60,
                   help="with --photos: how many photos, the first by name (default: 60)")
    p.add_argument("--weights", default=str(RELEASED_WEIGHTS),
                   help="with --photos: the landmark weights (default: the released ones)")
    args = p.parse_args(argv)
    if problem := features_misfit(args.head, args.features):
        p.error(f"argument --features: {problem}; pass --head pip")
    return args


# ---------------------------------------------------------------- timing

def seconds(device: torch.device, fn: Callable[[], object]) -> float:
    """Wall time of fn(), waiting for the GPU's queued work at both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def whole_bursts(batches: int, workers: int) -> int:
    """`batches` rounded up to whole bursts: the workers start together, so their batches arrive together."""
    burst = max(1, workers)
    return -(-batches // burst) * burst


def loader_rate(loader: DataLoader, warmup: int, batches: int) -> float:
    """Images per second once the workers are up: the first `warmup` batches are not timed.

    Both counts are whole bursts, so batches that arrived with the last untimed one are not counted as free.
    """
    warmup, batches = whole_bursts(warmup, loader.num_workers), whole_bursts(batches, loader.num_workers)
    stream = iter(loader)
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    images = sum(len(next(stream)[0]) for _ in range(batches))
    return images / (time.perf_counter() - start)


def with_workers(loader: DataLoader, workers: int, dataset: FaceLandmarksDataset | None = None) -> DataLoader:
    """The training loader again, with another number of processes (or another dataset)."""
    dataset = loader.dataset if dataset is None else dataset
    return DataLoader(dataset, loader.batch_size, shuffle=True, drop_last=loader.drop_last,
                      num_workers=workers, pin_memory=loader.pin_memory)


def training_rate(targs: argparse.Namespace, batches: Iterator, warmup: int, n: int, device: torch.device,
                  amp: str) -> float:
    """Images per second of train.py's own step (forward, backward, optimiser) on a fresh model."""
    model = build_model(targs.head, targs.num_points, features=targs.features)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(targs, model)
    scheduler = make_scheduler(targs, optimizer, warmup + n)
    scaler = make_scaler(device, amp)
    loss_fn, _ = make_loss(targs, model)

    def steps(k: int) -> None:
        train_one_epoch(model, itertools.islice(batches, k), loss_fn, optimizer, scheduler, scaler, device,
                              amp, "", show=False)

    steps(warmup)
    return n * targs.batch_size / seconds(device, lambda: steps(n))


def latency_ms(net: Callable, image: torch.Tensor, runs: int, device: torch.device) -> float:
    """Median milliseconds of one call on one image."""
    for _ in range(LATENCY_WARMUP):
        net(image)
    return 1000 * statistics.median(seconds(device, lambda: net(image)) for _ in range(runs))


def inference_rate(net: Callable, images: torch.Tensor, warmup: int, n: int, device: torch.device) -> float:
    for _ in range(warmup):
        net(images)
    return n * len(images) / seconds(device, lambda: [net(images) for _ in range(n)])


# ---------------------------------------------------------------- one input size

def training_args(args: argparse.Namespace, img_size: int) -> argparse.Namespace:
    """train.py's write-up recipe (its augmentation, optimiser, loss) on the crop cache, at this size."""
    return resolve(dict(data_dir=args.data_dir, xml=args.xml, img_size=img_size, batch_size=args.batch_size,
                        workers=max(args.workers), cache=True, device=args.device, head=args.head,
                        features=args.features))


def loader_figures(args: argparse.Namespace, loader: DataLoader) -> dict:
    """The training loader alone: from the crop cache with each number of workers, and from the JPEGs."""
    row = {"loader_img_s": {}}
    for workers in args.workers:
        row["loader_img_s"][str(workers)] = loader_rate(with_workers(loader, workers), args.warmup, args.batches)
        print(f"  loader, cached, workers {workers}     {row['loader_img_s'][str(workers)]:8.1f} img/s", flush=True)
    cached = loader.dataset
    uncached = FaceLandmarksDataset(cached.faces, cached.transform, cached.indices)
    row["loader_uncached_img_s"] = loader_rate(with_workers(loader, 0, uncached), args.warmup, args.batches)
    print(f"  loader, uncached, workers 0   {row['loader_uncached_img_s']:8.1f} img/s", flush=True)
    return row


def training_figures(args: argparse.Namespace, targs: argparse.Namespace, loader: DataLoader,
                     device: torch.device) -> dict:
    """train.py's step on random tensors, then fed by the training loader; in what --amp auto picks, and in fp32."""
    images = torch.rand(args.batch_size, 1, targs.img_size, targs.img_size, device=device) * 2 - 1
    targets = torch.rand(args.batch_size, 2 * targs.num_points, device=device) - 0.5
    amp = resolve_amp("auto", device)
    row = {"amp": amp}
    for precision in dict.fromkeys([amp, "off"]):  # the default first; fp32 again only if it differs
        model_only = training_rate(targs, itertools.repeat((images, targets)), args.warmup, args.batches, device,
                                   precision)
        end_to_end = training_rate(targs, iter(loader), args.warmup, args.batches, device, precision)
        name = "bf16 autocast" if precision == "bf16" else "fp32"
        print(f"  training, {name:13s} model only {model_only:8.1f} img/s, end to end {end_to_end:8.1f} img/s "
              f"(workers {targs.workers}): an epoch ~{len(loader.dataset) / end_to_end:.0f} s, "
              f"{model_only / end_to_end:.2f}x the model-only time", flush=True)
        if precision == amp:  # above 1 the model waits for the loader
            row |= {"model_train_img_s": model_only, "e2e_train_img_s": end_to_end,
                    "epoch_vs_model": model_only / end_to_end}
        row |= {"model_train_img_s_fp32": model_only, "e2e_train_img_s_fp32": end_to_end}
    return row


def dlib_figures(args: argparse.Namespace, loader: DataLoader) -> dict:
    """dlib's 68-point shape predictor on the same faces and boxes, one face at a time, images decoded first."""
    if loader.dataset.faces[0].points.shape[0] != NUM_LANDMARKS:
        print("  dlib: not measured: its model puts iBUG's 68 points, and these labels have another markup", flush=True)
        return {"dlib_ms_per_face": None}
    if dlib_baseline.model_path() is None:
        print(f"  dlib: not measured: {dlib_baseline.INSTALL_HINT}", flush=True)
        return {"dlib_ms_per_face": None}
    predictor = dlib_baseline.load_predictor()
    faces = loader.dataset.faces[:DLIB_FACES]
    images = {face.image: np.asarray(open_gray(face.image)[0]) for face in faces}
    for face in faces[:LATENCY_WARMUP]:
        dlib_baseline.predict_points(predictor, images[face.image], face.box)
    times = [seconds(torch.device("cpu"), lambda: dlib_baseline.predict_points(predictor, images[f.image], f.box))
             for f in faces]
    ms = 1000 * statistics.median(times)
    print(f"  dlib's shape predictor        {ms:8.2f} ms per face (median of {len(faces)} faces)", flush=True)
    return {"dlib_ms_per_face": ms}


def onnx_runtime(model: torch.nn.Module, img_size: int, folder: Path) -> Callable | None:
    """The network exported by export.py and run by onnxruntime; None where onnx or onnxruntime is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    path = folder / "model.onnx"
    export_onnx(model, torch.zeros(2, 1, img_size, img_size), path)
    return onnx_runner(path)


def inference_ways(model: torch.nn.Module, img_size: int, folder: Path) -> dict[str, Callable]:
    """Each way of running the network that was tried on the CPU: "optimized" is what evaluate and predict run,
    "int8" what they run instead where the weights carry calibration crops and the CPU has VNNI."""
    ways = {"eager": model, "optimized": optimize_for_inference(model, img_size)}
    if next(model.parameters()).device.type != "cpu":
        return ways
    ways["eager_channels_last"] = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ways["traced_frozen"] = optimize_for_inference(model, img_size, fuse=False, bf16=False)
    ways["fp32"] = optimize_for_inference(model, img_size, bf16=False)  # the default before bf16
    runtime = onnx_runtime(model, img_size, folder)
    if runtime is not None:
        ways["onnxruntime"] = runtime
    if int8_supported():
        # Ranges from noise: this network is untrained, and only its speed is measured here.
        noise = torch.rand(8, 1, img_size, img_size, generator=torch.Generator().manual_seed(0))
        crops = to_calibration(noise * 2 - 1)
        ways["int8"] = int8_runner(quantize_body(model, img_size, crops), pip_head_of(model), img_size)
    return ways


def inference_figures(args: argparse.Namespace, img_size: int, num_points: int, device: torch.device) -> dict:
    """Batch-1 latency and batch-64 throughput of every way in inference_ways, under inference_mode."""
    model = build_model(args.head, num_points, features=args.features).to(device).eval()
    one = torch.rand(1, 1, img_size, img_size, device=device) * 2 - 1
    batch = torch.rand(INFER_BATCH, 1, img_size, img_size, device=device) * 2 - 1
    row = {}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode(), inference_autocast(device):
        for name, net in inference_ways(model, img_size, Path(folder)).items():
            suffix = "" if name == "optimized" else f"_{name}"
            row[f"infer_bs1_ms{suffix}"] = latency_ms(net, one, args.runs, device)
            row[f"infer_bs64_img_s{suffix}"] = inference_rate(net, batch, args.warmup, args.batches, device)
            print(f"  inference, {name:19s}{row[f'infer_bs1_ms{suffix}']:8.2f} ms per face at batch 1, "
                  f"{row[f'infer_bs64_img_s{suffix}']:.1f} img/s at batch {INFER_BATCH}", flush=True)
    return row


def measure(args: argparse.Namespace, img_size: int, device: torch.device) -> dict:
    """Every figure at one input size."""
    targs = training_args(args, img_size)
    loader, _, _, markup = make_loaders(targs, rank=0, world=1)
    targs.num_points = markup.num_points  # the labels' point count sets the network's outputs
    needed = max(whole_bursts(args.warmup, w) + whole_bursts(args.batches, w) for w in args.workers)
    if len(loader) < needed:
        raise UsageError(f"{args.xml}: {len(loader.dataset)} training faces make {len(loader)} batches of "
                         f"{args.batch_size}; --warmup {args.warmup} and --batches {args.batches} with --workers "
                         f"{max(args.workers)} need {needed}")
    print(f"img {img_size} (crop cache {loader.dataset.cache.size} px), batch {args.batch_size}, "
          f"{len(loader.dataset)} training faces", flush=True)
    return {"img_size": img_size, **loader_figures(args, loader), **training_figures(args, targs, loader, device),
            **inference_figures(args, img_size, markup.num_points, device), **dlib_figures(args, loader)}


# ---------------------------------------------------------------- the released network against the CPU's limits

# The matrix products that give this CPU's rates, measured in the same run as the network (2048 x 2048).
LIMIT_SIDE = 2048


def matrix_rates() -> dict[str, float]:
    """This CPU's matrix throughput, in G(FL)OP/s, in each precision the network runs in: fp32 and bf16
    products, and int8 by torch._int_mm (int8 in, int32 out), median of a few products each."""
    a, b = torch.randn(LIMIT_SIDE, LIMIT_SIDE), torch.randn(LIMIT_SIDE, LIMIT_SIDE)
    q = torch.randint(-128, 128, (LIMIT_SIDE, LIMIT_SIDE), dtype=torch.int8)
    a16, b16 = a.bfloat16(), b.bfloat16()
    products = {"fp32": lambda: a @ b, "bf16": lambda: a16 @ b16, "int8": lambda: torch._int_mm(q, q)}
    rates = {}
    for name, product in products.items():
        for _ in range(2):
            product()
        t = statistics.median(seconds(torch.device("cpu"), product) for _ in range(7))
        rates[name] = 2 * LIMIT_SIDE ** 3 / t / 1e9
    return rates


def network_gflop(model: torch.nn.Module, img_size: int) -> float:
    """The network's multiply-adds at one crop, counted by torch's FLOP counter (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, img_size, img_size))
    return counter.get_total_flops() / 1e9


def released_figures(args: argparse.Namespace) -> dict:
    """The released network as predict.py runs it (load_for_inference's network, the pip head's decoding
    included), one crop a call, in each CPU path it can take here, against this CPU's limit for that
    precision: the network's operations at the rate of matrix products, measured in the same run."""
    from checkpoints import cpu_candidates, load_checkpoint, load_for_inference, model_from
    checkpoint = load_checkpoint(RELEASED_WEIGHTS)
    gflop = network_gflop(model_from(checkpoint, RELEASED_WEIGHTS), 160)
    rates = matrix_rates()
    row = {"gflop": gflop, "rates_gops": rates, "ms": {}, "limit_ms": {}}
    one = torch.rand(1, 1, 160, 160) * 2 - 1
    print(f"\nthe released network, {gflop:.2f} GFLOP a face, as predict.py runs it (decoding included), one face "
          f"a call; this CPU's matrix rates in the same run: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
          + " G(FL)OP/s", flush=True)
    for precision in cpu_candidates(checkpoint, True):
        network, _ = load_for_inference(RELEASED_WEIGHTS, precision=precision)
        ms = latency_ms(network.with_scores, one, args.runs, torch.device("cpu"))
        limit = gflop / rates[precision.removeprefix("openvino-")] * 1000
        row["ms"][precision], row["limit_ms"][precision] = ms, limit
        print(f"  {precision:13s} {ms:7.2f} ms a face; its limit {limit:5.2f} ms ({100 * limit / ms:.0f}% of it)",
              flush=True)
    chosen, _ = load_for_inference(RELEASED_WEIGHTS)
    row["chosen"] = chosen.precision
    print(f"  what predict.py takes on this CPU: {chosen.precision} (timed on its first start and kept)", flush=True)
    return row


# ---------------------------------------------------------------- main

def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------- whole photos

def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def dlib_pipeline(files: list[Path]) -> tuple[float, int]:
    """dlib's own way, one process: decode in grayscale, HOG at upsample 1, its 68-point model on each box."""
    hog, predictor = load_hog(), dlib_baseline.load_predictor()

    def run() -> int:
        faces = 0
        for path in files:
            gray = np.asarray(to_gray(read_photo(path)))
            for box in detect_faces(hog, gray, HOG_UPSAMPLE):
                dlib_baseline.predict_points(predictor, gray, box)
                faces += 1
        return faces

    return timed(run)


def detector_times(files: list[Path]) -> dict:
    """Milliseconds per photo of each detector alone, on photos already decoded."""
    pictures = [np.asarray(read_photo(path).convert("RGB")) for path in files]
    row = {}
    for name, any_roll in (("yunet", False), ("yunet", True), ("hog", False)):
        detect = make_detector(name, any_roll)
        detect(pictures[0])
        seconds, found = timed(lambda: [len(detect(p)) for p in pictures])
        key = f"{name}{'_any_roll' if any_roll else ''}"
        row |= {f"{key}_ms_per_photo": 1000 * seconds / len(pictures), f"{key}_faces": sum(found)}
    return row


def ours(files: list[Path], weights: str, workers: int) -> tuple[float, float, int]:
    """predict.py --image --no-draw's photo loop: seconds in all (workers starting included), seconds from
    the first photo done to the last, and faces found."""
    settings = PhotoSettings(LandmarkerOptions(weights=weights), draw=False)
    start, first, faces = time.perf_counter(), None, 0
    for record, _ in landmark_photos(files, drawn_names(files), settings, workers):
        first = first or time.perf_counter()
        faces += len(record["faces"])
    end = time.perf_counter()
    return end - start, end - first, faces


def twelve_megapixels(photo: Path, weights: str, folder: Path) -> dict:
    """What a 12-megapixel JPEG of the same photo costs the Landmarker over the photo itself."""
    big = folder / "12mp.jpg"
    Image.open(photo).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(big, quality=92)
    landmarker = Landmarker(weights=weights)
    row = {}
    for name, path in (("small", photo), ("12mp", big)):
        landmarker(path)
        row[f"{name}_ms"] = 1000 * statistics.median(timed(lambda: landmarker(path))[0] for _ in range(5))
    return row | {"12mp_extra_ms": row["12mp_ms"] - row["small_ms"]}


def photo_figures(args: argparse.Namespace) -> dict:
    files = photo_files(args.photos, recursive=True).files[:args.photo_count]
    if not files:
        raise UsageError(f"--photos {' '.join(args.photos)}: no photos found")
    print(f"{len(files)} photos, {describe(torch.device('cpu'))}", flush=True)
    row = {"photos": len(files), **detector_times(files)}
    for key in ("yunet", "yunet_any_roll", "hog"):
        print(f"  {key:15s} {row[f'{key}_ms_per_photo']:7.1f} ms per photo, {row[f'{key}_faces']} faces", flush=True)
    seconds, faces = dlib_pipeline(files)
    row |= {"dlib_photos_per_s": len(files) / seconds, "dlib_faces": faces}
    print(f"  dlib's pipeline (HOG + 68-point model, one process): {row['dlib_photos_per_s']:.1f} photos/s, "
          f"{faces} faces", flush=True)
    workers = os.cpu_count() or 1
    total, steady, faces = ours(files, args.weights, workers)
    row |= {"ours_photos_per_s": len(files) / total, "ours_steady_photos_per_s": (len(files) - 1) / steady,
            "ours_faces": faces, "workers": workers}
    print(f"  predict.py --no-draw ({workers} workers): {row['ours_photos_per_s']:.1f} photos/s start-up included, "
          f"{row['ours_steady_photos_per_s']:.1f} from the first photo on, {faces} faces; "
          f"{row['ours_photos_per_s'] / row['dlib_photos_per_s']:.1f}x dlib's pipeline start-up included, "
          f"{row['ours_steady_photos_per_s'] / row['dlib_photos_per_s']:.1f}x from the first photo on", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        row |= twelve_megapixels(files[0], args.weights, Path(folder))
    print(f"  one photo: {row['small_ms']:.0f} ms; as a 12-megapixel JPEG: {row['12mp_ms']:.0f} ms "
          f"(+{row['12mp_extra_ms']:.0f} ms)", flush=True)
    if args.json:
        write_atomic(Path(args.json), json.dumps(row, indent=2) + "\n")
    return row


def main(args: argparse.Namespace) -> list[dict] | dict:
    with one_line_errors():
        return photo_figures(args) if args.photos else bench(args)


def bench(args: argparse.Namespace) -> list[dict]:
    labels = Path(args.data_dir) / args.xml
    if not labels.is_file():
        raise UsageError(f"--data-dir {args.data_dir}: no {args.xml} there; benchmark.py times training on faces in "
                         f"dlib's layout: pass --data-dir data after `bash download.sh` (which fills data/), or "
                         f"--data-dir demo after `python demo.py demo`")
    device = pick_device(args.device)
    seed_everything(0)
    print(describe(device), flush=True)
    rows = [measure(args, size, device) for size in args.img_sizes]
    print(f"\n{args.head} head ({args.features}); --amp auto chose {rows[0]['amp']}")
    print(f"{'img':>4} {'loader img/s by workers':>24} {'train img/s':>12} {'fp32':>6} {'e2e img/s':>10} "
          f"{'bs1 ms':>7} {'fp32':>6} {'int8':>6} {'eager':>6} {'dlib':>6} {'/dlib':>6} {'bs64 img/s':>11}")
    for r in rows:
        loaders = " ".join(f"{w}:{v:.0f}" for w, v in r["loader_img_s"].items())
        dlib = r["dlib_ms_per_face"]
        dlib_ms, ratio = ("-", "-") if dlib is None else (f"{dlib:.2f}", f"{r['infer_bs1_ms'] / dlib:.1f}x")
        int8 = f"{r['infer_bs1_ms_int8']:.2f}" if "infer_bs1_ms_int8" in r else "-"
        print(f"{r['img_size']:>4} {loaders:>24} {r['model_train_img_s']:>12.1f} "
              f"{r['model_train_img_s_fp32']:>6.1f} {r['e2e_train_img_s']:>10.1f} "
              f"{r['infer_bs1_ms']:>7.2f} {r.get('infer_bs1_ms_fp32', r['infer_bs1_ms']):>6.2f} {int8:>6} "
              f"{r['infer_bs1_ms_eager']:>6.2f} "
              f"{dlib_ms:>6} {ratio:>6} {r['infer_bs64_img_s']:>11.1f}")
    if device.type == "cpu" and RELEASED_WEIGHTS.is_file() and (args.head, args.features) == ("pip", "stride16") \
            and 160 in args.img_sizes:  # the release's own network: it too, as predict.py runs it
        rows.append({"released": released_figures(args)})
    if args.json:
        write_atomic(Path(args.json), json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main(parse_args())
