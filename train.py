"""The training loop: data, loss, optimiser, schedule, per-epoch log, atomic checkpoints, resume, and DDP under torchrun."""
import argparse
import csv
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from dataset import (CACHE_EXTENT, SEED_MAX, TRAIN_XML, FaceCache, FaceLandmarksDataset, Markup, fit_box_relation,
                     flip_pairs_arg, labels_fingerprint, load_faces, markup_for, nme, number_in, out_folder,
                     point_pair_arg, split_faces)
from model import (AMP_CHOICES, HEADS, MAX_IMG_SIZE, MIN_IMG_SIZE, PIPHead, autocast, build_model, load_checkpoint,
                   pick_device, resolve_amp, save_atomic)
from transforms import CROP_MARGIN, Transforms, box_diagonal, mean_shape

try:
    import fcntl
except ImportError:  # Windows: two runs on one --out are not guarded there
    fcntl = None

# The write-up's recipe: what `python train.py` runs when no flag says otherwise.
DEFAULTS = dict(data_dir="data", xml=TRAIN_XML, epochs=10, batch_size=64, val_batch_size=8, lr=1e-4, seed=0,
                workers=2, device="auto", out="runs", resume=None, cache=False, skip_bad=False, val_fraction=0.1,
                flip_pairs=None, nme_points=None,
                recipe="writeup", img_size=224, rotation=10.0, scale=0.0, shift=0.0, flip=False, occlusion=0.0,
                loss="mse", optimizer="adam", weight_decay=0.0, sched="none", warmup_epochs=0, pretrained=False,
                select=None, amp="auto", head="regression")
# Measured on the 300-W subset (README, "Results"); explicit flags still override these.
RECIPES = {
    "writeup": {},
    "best": dict(head="pip", img_size=160, epochs=96, batch_size=32, lr=1e-3, optimizer="adamw",
                 weight_decay=1e-4, sched="cosine", warmup_epochs=1, loss="wing", flip=True, scale=0.1,
                 shift=0.05, rotation=15.0, cache=True),
}
# Changing any of these leaves the write-up's recipe, and then checkpoints are compared by NME.
RECIPE_KEYS = ["img_size", "rotation", "scale", "shift", "flip", "occlusion", "loss", "optimizer", "weight_decay",
               "sched", "warmup_epochs", "pretrained", "recipe", "head"]
# With --resume these flags must equal the checkpoint's, because they fix the split (seed, val_fraction),
# what the weights are (img_size, pretrained, head), the optimiser's state (optimizer) or what the validation
# loss and NME mean (loss, recipe, flip_pairs, nme_points). Every other flag given now wins, including those whose values also live in the
# optimiser's and schedule's state (lr, weight_decay, epochs, sched, warmup_epochs, batch_size), which
# load_training_state writes in after loading, --amp, which takes effect from the next step, and --select,
# whose best score is read again from the log. A new flag goes here unless it can take effect so.
RESUME_FIXED = ["seed", "val_fraction", "img_size", "pretrained", "head", "optimizer", "loss", "recipe",
                "flip_pairs", "nme_points"]
# What a checkpoint needs to resume from; best.pt holds only the weights, settings and scores.
RESUME_KEYS = ["model", "optimizer", "scheduler", "epoch", "best", "history", "config"]
LOCK_NAME = ".lock"
# Wing loss (Feng et al. 2018) in pixels of a 224 px crop, whatever --img-size is.
WING_W, WING_EPSILON, WING_PIXELS = 10.0, 2.0, 224
# PIPNet's weight of the score maps against the offsets (Jin et al. 2021).
PIP_SCORE_WEIGHT = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags given on the command line beat the checkpoint's (on --resume), which beat the recipe's,
    which beat DEFAULTS."""
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=f"folder holding dlib's XML and images (default: {d['data_dir']})")
    p.add_argument("--xml", help=f"labels file inside --data-dir (default: {d['xml']})")
    p.add_argument("--epochs", type=number_in(int, 1), help=f"epochs to train (default: {d['epochs']})")
    p.add_argument("--batch-size", type=number_in(int, 1), help=f"training batch size (default: {d['batch_size']})")
    p.add_argument("--val-batch-size", type=number_in(int, 1),
                   help=f"validation batch size (default: {d['val_batch_size']})")
    p.add_argument("--lr", type=number_in(float, 0, low_open=True), help=f"learning rate (default: {d['lr']})")
    p.add_argument("--seed", type=number_in(int, 0, SEED_MAX),
                   help=f"seed for the split, the augmentation and the init (default: {d['seed']})")
    p.add_argument("--workers", type=number_in(int, 0), help=f"data-loading processes (default: {d['workers']})")
    p.add_argument("--device", help="cpu, cuda, cuda:N, or auto: cuda when present (default: auto)")
    p.add_argument("--out", type=out_folder,
                   help=f"folder for weights, checkpoint, log and curves (default: {d['out']})")
    p.add_argument("--resume", nargs="?", const="", metavar="CKPT",
                   help="continue from a checkpoint (default file: OUT/last.pt), with its settings")
    p.add_argument("--allow-changed-labels", action="store_true", default=False,
                   help="with --resume: go on although the labels changed since the checkpoint (the split changes)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction,
                   help="crop every face once into a memory-mapped cache beside the XML (default: off)")
    p.add_argument("--skip-bad", action="store_true", help="skip bad faces instead of stopping at the first")
    p.add_argument("--val-fraction", type=number_in(float, 0, 1, low_open=True, high_open=True),
                   help=f"share held out for validation (default: {d['val_fraction']})")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="preset: writeup (default) or best; flags override it")
    p.add_argument("--img-size", type=number_in(int, MIN_IMG_SIZE, MAX_IMG_SIZE),
                   help=f"side of the network input (default: {d['img_size']})")
    p.add_argument("--rotation", type=number_in(float, 0, 180),
                   help=f"max random rotation, degrees (default: {d['rotation']})")
    p.add_argument("--scale", type=number_in(float, 0, 1, high_open=True),
                   help="random zoom of the crop, +-fraction (default: 0)")
    p.add_argument("--shift", type=number_in(float, 0, 0.5),
                   help="random shift of the crop, +-fraction of its side (default: 0)")
    p.add_argument("--occlusion", type=number_in(float, 0, 1),
                   help="chance of a random noise rectangle over part of the face, its points still labelled "
                        "(default: 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flip (default: off); needs --flip-pairs unless the labels are iBUG's 68")
    p.add_argument("--flip-pairs", type=flip_pairs_arg, metavar="PAIRS",
                   help="which point mirrors which: a JSON file [[i, j], ...] or \"0,3 1,2\" (default: iBUG's "
                        "twins for 68 points, none otherwise)")
    p.add_argument("--nme-points", type=point_pair_arg, metavar="I,J",
                   help="the two points whose distance normalises NME (default: the outer eye corners 36,45 for "
                        "68 points; otherwise NME is normalised by the box diagonal)")
    p.add_argument("--loss", choices=["mse", "l1", "smoothl1", "wing"], help="loss (default: mse)")
    p.add_argument("--optimizer", choices=["adam", "adamw"], help="optimiser (default: adam)")
    p.add_argument("--weight-decay", type=number_in(float, 0), help="weight decay (default: 0)")
    p.add_argument("--sched", choices=["none", "cosine"], help="learning-rate schedule (default: none)")
    p.add_argument("--warmup-epochs", type=number_in(int, 0), help="linear warm-up before the cosine (default: 0)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="start from torchvision's ImageNet weights (needs internet once; default: off)")
    p.add_argument("--head", choices=list(HEADS),
                   help="regression: the write-up's 136-value fc (default); pip: PIPNet's score maps and offsets")
    p.add_argument("--amp", choices=list(AMP_CHOICES),
                   help="bf16 autocast: auto uses it where the device does bf16 in hardware (default: auto)")
    p.add_argument("--select", choices=["loss", "nme"],
                   help="keep the weights with the best validation loss or NME (default: loss for the "
                        "write-up's recipe, nme as soon as any flag beyond it is used)")
    given = vars(p.parse_args(argv))
    config = dict(DEFAULTS)
    config.update(RECIPES[given.get("recipe", DEFAULTS["recipe"])])
    if given.get("resume") is not None:
        given["resume"] = given["resume"] or str(Path(given.get("out", config["out"])) / "last.pt")
        checkpoint = resumable_checkpoint(given["resume"])
        for key in RESUME_FIXED:
            saved = checkpoint["config"].get(key, config[key])
            if key in given and given[key] != saved:
                p.error(f"argument --{key.replace('_', '-')}: {given[key]} differs from {saved} in "
                        f"{given['resume']}, and it fixes the run; resume without it, or start a new run "
                        f"with another --out")
        config.update(checkpoint["config"])
        if given.get("epochs", config["epochs"]) <= checkpoint["epoch"]:
            p.error(f"argument --epochs: {given['resume']} has trained {checkpoint['epoch']} epochs of "
                    f"{given.get('epochs', config['epochs'])}; pass --epochs above {checkpoint['epoch']} to go on")
    config.update(given)
    if config["select"] is None:
        beyond = any(config[k] != DEFAULTS[k] for k in RECIPE_KEYS)
        config["select"] = "nme" if beyond else "loss"
    return argparse.Namespace(**config)


def resumable_checkpoint(path: str) -> dict:
    """A checkpoint --resume can continue from, or one line saying why not and what to pass instead."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        last = Path(path).parent / "last.pt"
        instead = (f"pass --resume {last}" if last.is_file() and last.resolve() != Path(path).resolve()
                   else "start a new run without --resume")
        raise SystemExit(f"{path}: holds no {', '.join(missing)}, so training cannot resume from it (best.pt "
                         f"keeps only the weights, last.pt the whole state); {instead}")
    return checkpoint


# ---------------------------------------------------------------- pieces of the loop

def wing_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = (pred - target).abs() * WING_PIXELS
    c = WING_W - WING_W * math.log(1 + WING_W / WING_EPSILON)
    return torch.where(x < WING_W, WING_W * torch.log1p(x / WING_EPSILON), x - c).mean()


LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smoothl1": F.smooth_l1_loss, "wing": wing_loss}


def pip_loss(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, neighbour_index: torch.Tensor) -> torch.Tensor:
    """PIPNet's loss: MSE of the score maps against a one-hot map of each landmark's cell, plus L1 of the
    offsets read at that cell, its own and its neighbours' (in cells)."""
    scores, offsets, neighbour_offsets = (o.float() for o in outputs)
    n, k, h, w = scores.shape
    points = (targets.view(n, k, 2) + 0.5) * w                 # grid units; crops are square
    cell = points.detach().floor().clamp(0, w - 1)
    best = (cell[..., 1] * w + cell[..., 0]).long()           # (N, K)
    score_loss = F.mse_loss(scores.flatten(2), F.one_hot(best, h * w).float())
    own, theirs = PIPHead.read_cells(offsets, neighbour_offsets, best)
    own_loss = F.l1_loss(own, points - cell)
    neighbour_loss = F.l1_loss(theirs, points[:, neighbour_index] - cell[:, :, None])
    return PIP_SCORE_WEIGHT * score_loss + 2 * (own_loss + neighbour_loss)  # x and y each count once, as in PIPNet


def make_loss(args: argparse.Namespace, model: nn.Module) -> tuple[Callable, Callable]:
    """The training loss, and the validation loss on the decoded coordinates (the same for the regression
    head; L1 for the pip head, whose training loss needs the raw maps)."""
    if args.head == "pip":
        index = model.head.neighbour_index
        return (lambda outputs, targets: pip_loss(outputs, targets, index)), F.l1_loss
    loss = LOSSES[args.loss]
    return (lambda outputs, targets: loss(outputs.float(), targets)), loss  # in fp32 under autocast too


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    kind = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return kind(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def make_scaler(device: torch.device, amp: str) -> torch.amp.GradScaler:
    """Loss scaling, which only fp16 needs: on CUDA without bf16 when autocast is on."""
    return torch.amp.GradScaler(enabled=device.type == "cuda" and amp != "off" and not torch.cuda.is_bf16_supported())


def make_scheduler(args: argparse.Namespace, optimizer, steps_per_epoch: int):
    """Per-step multiplier of the learning rate: constant, or linear warm-up then cosine to zero."""
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if args.sched == "none":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Rank, world size and device; under torchrun this joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device, local_rank)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return rank, world, device


def markup_from_flags(args: argparse.Namespace) -> Callable[[int], Markup]:
    """The markup of the labels' K points with --flip-pairs and --nme-points; load_faces calls it once K is
    known, and stops with one line when the flags do not fit K points."""
    pairs = args.flip_pairs and [tuple(p) for p in args.flip_pairs]
    return lambda num_points: markup_for(num_points, pairs, args.nme_points)


def make_loaders(args: argparse.Namespace, rank: int,
                 world: int) -> tuple[DataLoader, DataLoader, DistributedSampler, Markup]:
    """The loaders, and the labels' markup: its point count read from them, the rest from the flags, and
    where dlib's box lies around its points fitted on the training faces (for video tracking)."""
    xml = Path(args.data_dir) / args.xml
    markup_of = markup_from_flags(args)
    faces = load_faces(xml, args.skip_bad, markup=markup_of)
    markup = markup_of(len(faces[0].points))
    if args.flip and markup.flip is None:
        raise SystemExit(f"--flip: {xml} has {markup.num_points} points, and which is the mirror twin of which "
                         f"is known only for iBUG's 68; give --flip-pairs (\"0,3 1,2\" or a JSON file), or --no-flip")
    train_idx, val_idx = split_faces(len(faces), args.val_fraction, args.seed)
    if not train_idx or not val_idx:
        raise SystemExit(f"{xml}: --val-fraction {args.val_fraction:g} of {len(faces)} faces leaves {len(train_idx)} "
                         f"for training and {len(val_idx)} for validation; each needs at least one face")
    markup = replace(markup, box_relation=fit_box_relation([faces[i] for i in train_idx])[0])
    cache = None
    if args.cache:
        if rank == 0:  # one process builds the cache; the others wait, then read it
            cache = FaceCache(faces, xml, round(args.img_size * CACHE_EXTENT), CROP_MARGIN, os.cpu_count() or 1)
        if world > 1:
            dist.barrier()
        cache = cache or FaceCache(faces, xml, round(args.img_size * CACHE_EXTENT), CROP_MARGIN)
    train_tf = Transforms(args.img_size, True, args.rotation, args.scale, args.shift, args.flip,
                          flip_permutation=markup.flip, occlusion=args.occlusion)
    train_set = FaceLandmarksDataset(faces, train_tf, train_idx, cache)
    val_set = FaceLandmarksDataset(faces, Transforms(args.img_size, train=False), val_idx, cache)
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(args.seed)
    common = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=len(train_set) > args.batch_size, generator=generator, **common)
    val_loader = DataLoader(val_set, args.val_batch_size, **common)
    return train_loader, val_loader, sampler, markup


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, amp: str, desc: str,
                    show: bool) -> tuple[float, float]:
    """Mean training loss, and images per second over the epoch (loading included)."""
    from tqdm import tqdm
    model.train()
    total, count, started = 0.0, 0, time.time()
    bar = tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total, count = total + loss.item() * len(images), count + len(images)
        if not math.isfinite(total):
            break  # diverged: the caller stops the run, and nothing of this epoch is saved
        bar.set_postfix(loss=f"{total / count:.5f}", img_s=f"{count / (time.time() - started):.0f}")
    return total / max(count, 1), count / (time.time() - started)


@torch.no_grad()
def validate(model, loader, loss_fn, device, amp: str, markup: Markup) -> tuple[float, float]:
    """Mean loss and mean NME (%) on the validation set; NME in crop coordinates equals NME in the image
    because the validation crop is a similarity transform."""
    model.eval()
    losses, preds, truths = [], [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            pred = model(images).float()
        losses.append(loss_fn(pred, targets).item() * len(images))
        preds.append(pred.cpu().numpy())
        truths.append(targets.cpu().numpy())
    dataset = loader.dataset  # not shuffled: the faces in order, for their boxes' diagonals
    diagonals = [box_diagonal(dataset.faces[i].box) for i in dataset.indices]
    k = markup.num_points
    errors = nme(np.concatenate(preds).reshape(-1, k, 2), np.concatenate(truths).reshape(-1, k, 2), markup, diagonals)
    return sum(losses) / len(errors), float(errors.mean())


def write_log(history: list[dict], out: Path) -> None:
    """The whole history, rewritten each epoch, so a resumed run never duplicates or loses a row."""
    tmp = out / ".log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "log.csv")


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_nme) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_loss.legend()
    ax_nme.plot(epochs, [row["val_nme"] for row in history], color="C1")
    ax_nme.set(xlabel="epoch", ylabel="NME (%)", title="validation NME")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_or_warn(state: dict, path: Path) -> None:
    """A failed save (full disk, say) keeps the previous file and the run goes on."""
    try:
        save_atomic(state, path)
    except (OSError, RuntimeError) as e:
        print(f"warning: could not write {path} ({e}); the previous {path.name} is kept", file=sys.stderr)


def report_interrupt(checkpoint_state: Callable[[int], dict], completed: int, saved: int, out: Path) -> None:
    """Ctrl-C: keep the state after the last completed epoch, never a half-trained one, so that
    --resume repeats exactly the interrupted epoch."""
    if completed > saved:  # the epoch ended but its checkpoint was not written yet
        save_or_warn(checkpoint_state(completed), out / "last.pt")
    if completed == 0:
        print("\ninterrupted before the first epoch ended; nothing to resume", file=sys.stderr)
        return
    print(f"\ninterrupted: {out / 'last.pt'} holds epoch {completed}; "
          f"continue with: python train.py --resume {out / 'last.pt'}", file=sys.stderr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- resuming, and guarding the run

def check_labels(checkpoint: dict, labels: str, args: argparse.Namespace) -> None:
    """Other labels than the checkpoint's would silently draw another split: stop, unless the user says so."""
    saved = checkpoint.get("labels_sha256")
    if saved is None:
        print(f"note: {args.resume} records no fingerprint of its labels (older train.py); they are not checked",
              file=sys.stderr)
    elif saved != labels and not args.allow_changed_labels:
        raise SystemExit(f"{Path(args.data_dir) / args.xml}: the labels differ from those {args.resume} was trained "
                         f"on, so the train/validation split would change; pass --allow-changed-labels to resume "
                         f"anyway")


def load_training_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                        checkpoint: dict, args: argparse.Namespace, steps_per_epoch: int) -> None:
    """The optimiser's and schedule's state from the checkpoint, then the flags given now win: lr and weight
    decay live in the optimiser's groups, and the schedule counted steps of the old --batch-size towards the
    old --epochs. With the same flags this reproduces the saved state exactly."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scheduler.last_epoch = checkpoint["epoch"] * steps_per_epoch
    scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = args.lr, args.weight_decay
        group["lr"] = args.lr * scheduler.lr_lambdas[0](scheduler.last_epoch)


def stop_if_diverged(loss: float, which: str, epoch: int, saved: int, args: argparse.Namespace) -> None:
    """A NaN or infinite loss ends the run before anything of this epoch is saved."""
    if math.isfinite(loss):
        return
    last = Path(args.out) / "last.pt"
    kept = f"best.pt and last.pt keep epoch {saved}" if saved else "no weights were saved"
    again = f" (python train.py --resume {last} --lr {args.lr / 10:g})" if saved else ""
    raise SystemExit(f"epoch {epoch}: the {which} loss became {loss}, the run diverged; {kept}; "
                     f"try a lower --lr than {args.lr:g}{again}")


@contextmanager
def hold_folder(out: Path) -> Iterator[None]:
    """An exclusive lock on OUT/.lock while the run lasts, so that a second run on the same --out stops with
    one line instead of interleaving its checkpoints and log with this one's. The kernel drops the lock
    when the process ends, however it ends; a lock file left by a killed run is simply taken over."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = out / LOCK_NAME
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise SystemExit(f"{out}: another train.py ({holder}) is writing to this folder; wait for it to "
                             f"end, or pass another --out") from None
        try:
            ours = os.path.samestat(os.fstat(lock.fileno()), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        lock.close()  # the file was deleted by the run that just ended: lock the one in its place
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}")
    lock.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        lock.close()


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> list[dict]:
    rank, world, device = setup_distributed(args)
    seed_everything(args.seed + rank)
    show = rank == 0
    out = Path(args.out)
    if show:
        out.mkdir(parents=True, exist_ok=True)
    train_loader, val_loader, sampler, markup = make_loaders(args, rank, world)
    labels = labels_fingerprint(train_loader.dataset.faces, (Path(args.data_dir) / args.xml).parent)
    model = build_model(args.pretrained, args.head, markup.num_points)
    if args.head == "pip":  # each landmark's neighbours, from the training faces' mean shape
        train_set = train_loader.dataset
        model.head.set_neighbours(torch.from_numpy(mean_shape([train_set.faces[i] for i in train_set.indices])))
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(args, model)
    scheduler = make_scheduler(args, optimizer, len(train_loader))
    amp = resolve_amp(args.amp, device)
    scaler = make_scaler(device, amp)
    loss_fn, val_loss_fn = make_loss(args, model)
    history, best, start = [], math.inf, 0
    if args.resume:
        checkpoint = load_checkpoint(args.resume, device)
        check_labels(checkpoint, labels, args)
        model.load_state_dict(checkpoint["model"])
        load_training_state(optimizer, scheduler, checkpoint, args, len(train_loader))
        history, best, start = checkpoint["history"], checkpoint["best"], checkpoint["epoch"]
        if args.select != checkpoint["config"].get("select"):  # the best so far by the figure chosen now
            best = min(row["val_nme" if args.select == "nme" else "val_loss"] for row in history)
        if show:
            print(f"resumed from {args.resume} after epoch {start}")
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    config = vars(args) | {"margin": CROP_MARGIN, "precision": amp, "markup": markup.to_config()}
    if show:
        print(f"{len(train_loader.dataset)} training and {len(val_loader.dataset)} validation faces of "
              f"{markup.num_points} points (NME over the {markup.normalisation}); "
              f"device {device}; {args.head} head; precision {'bf16 autocast' if amp == 'bf16' else 'fp32'} "
              f"(--amp {args.amp}); keeping the best validation {args.select}")

    def checkpoint_state(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "history": history,
                "config": config, "labels_sha256": labels}

    saved = start  # epochs held by the last.pt on disk
    try:
        for epoch in range(start, args.epochs):
            started = time.time()
            if sampler is not None:
                sampler.set_epoch(epoch)
            train_loader.generator.manual_seed(args.seed + epoch)
            train_loss, img_s = train_one_epoch(trained, train_loader, loss_fn, optimizer, scheduler, scaler, device,
                                                amp, f"epoch {epoch + 1}/{args.epochs}", show)
            stop_if_diverged(train_loss, "training", epoch + 1, saved, args)
            val_loss, val_nme = validate(model, val_loader, val_loss_fn, device, amp, markup)
            stop_if_diverged(val_loss, "validation", epoch + 1, saved, args)
            row = dict(epoch=epoch + 1, train_loss=round(train_loss, 6), val_loss=round(val_loss, 6),
                       val_nme=round(val_nme, 3), lr=optimizer.param_groups[0]["lr"],
                       seconds=round(time.time() - started, 1), train_img_s=round(img_s, 1))
            history.append(row)
            if not show:
                continue
            score = val_nme if args.select == "nme" else val_loss
            if score < best:
                save_or_warn({"model": model.state_dict(), "config": config, "epoch": epoch + 1,
                              "val_loss": val_loss, "val_nme": val_nme, "labels_sha256": labels}, out / "best.pt")
                best = score
            save_or_warn(checkpoint_state(epoch + 1), out / "last.pt")
            saved = epoch + 1
            write_log(history, out)
            print(f"epoch {epoch + 1}/{args.epochs}  train_loss {train_loss:.5f}  val_loss {val_loss:.5f}  "
                  f"val_nme {val_nme:.2f}%  {img_s:.0f} img/s  {row['seconds']:.0f}s{'  *' if score == best else ''}",
                  flush=True)
    except KeyboardInterrupt:
        if show:
            report_interrupt(checkpoint_state, len(history), saved, out)
        raise SystemExit(130)
    if show and history:
        plot_curves(history, out / "curves.png")
        print(f"best validation {args.select}: {best:.5g}; weights in {out / 'best.pt'}, "
              f"log in {out / 'log.csv'}, curves in {out / 'curves.png'}")
    if world > 1:
        dist.destroy_process_group()
    return history


def main(args: argparse.Namespace) -> list[dict]:
    """The run, holding --out against a second run there (rank 0 only: the other ranks write nothing)."""
    with hold_folder(Path(args.out)) if int(os.environ.get("RANK", 0)) == 0 else nullcontext():
        return run(args)


if __name__ == "__main__":
    main(parse_args())
