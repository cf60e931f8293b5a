"""The pieces of a training run: losses (PIPNet's, wing), optimiser, schedule, distributed set-up, one epoch, validation, the log and the curves."""
import argparse
import csv
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from checkpoints import RELEASED_WEIGHTS
from dataset import CACHE_EXTENT, FaceCache, FaceLandmarksDataset, split_faces
from errors import UsageError
from files import save_figure
from labels import load_faces
from landmarks import IBUG, Face, Markup, fit_box_relation, markup_for, nme, outline_chords
from model import PIPHead
from network_cache import cache_dir
from runtime import autocast, pick_device
from teacher import teach
from transforms import CROP_MARGIN, Transforms, box_diagonal

# Wing loss (Feng et al. 2018) in pixels of a 224 px crop, whatever --img-size is.
WING_W, WING_EPSILON, WING_PIXELS = 10.0, 2.0, 224


# PIPNet's weight of the score maps against the offsets (Jin et al. 2021).
PIP_SCORE_WEIGHT = 10.0


def wing_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = (pred - target).abs() * WING_PIXELS
    c = WING_W - WING_W * math.log(1 + WING_W / WING_EPSILON)
    return torch.where(x < WING_W, WING_W * torch.log1p(x / WING_EPSILON), x - c).mean()


LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "smoothl1": F.smooth_l1_loss, "wing": wing_loss}


def point_frames(points: torch.Tensor, outline: tuple[list[int], list[int], list[int]] | None,
                 along_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's direction (N, K, 2) and the weight (K,) of an error along it: on an outline, the outline's
    direction from the true neighbouring points, weighted `along_weight`; elsewhere x, weighted 1 (an error
    then counts |dx| + |dy|, plain L1)."""
    n, k, _ = points.shape
    direction = points.new_zeros(n, k, 2)
    direction[..., 0] = 1
    weight = points.new_ones(k)
    if outline is not None and along_weight != 1:
        idx, before, after = outline
        chord = points[:, after] - points[:, before]
        direction[:, idx] = chord / chord.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        weight[idx] = along_weight
    return direction, weight


def anisotropic_l1(error: torch.Tensor, direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of |across| + weight * |along| per coordinate pair, halved as F.l1_loss averages x and y: an
    outline point's error split across its outline and along it (ADNet's anisotropic loss, Huang et al.
    ICCV 2021, on PIPNet's offsets); the plain L1 loss where every weight is 1 and every direction x."""
    along = (error * direction).sum(-1)
    across = error[..., 0] * direction[..., 1] - error[..., 1] * direction[..., 0]
    return (across.abs() + weight * along.abs()).mean() / 2


def pip_loss(outputs: tuple[torch.Tensor, ...], targets: torch.Tensor, neighbour_index: torch.Tensor,
             outline: tuple[list[int], list[int], list[int]] | None = None, along_weight: float = 1.0) -> torch.Tensor:
    """PIPNet's loss: MSE of the score maps against a one-hot map of each landmark's cell, plus L1 of the
    offsets read at that cell, its own and its neighbours' (in cells). Targets of (N, 3K) carry each point's
    visibility after its coordinates (Transforms' visibility=True): a covered point's map is taught flat,
    while its offsets still learn where it is. With `outline` (landmarks.outline_chords), an offset's error
    along the outline weighs `along_weight` against 1 across it (anisotropic_l1)."""
    scores, offsets, neighbour_offsets = (o.float() for o in outputs)
    n, k, h, w = scores.shape
    visible = targets[:, 2 * k:] if targets.shape[1] == 3 * k else targets.new_ones(n, k)
    targets = targets[:, :2 * k]
    points = (targets.view(n, k, 2) + 0.5) * w                 # grid units; crops are square
    cell = points.detach().floor().clamp(0, w - 1)
    best = (cell[..., 1] * w + cell[..., 0]).long()           # (N, K)
    score_loss = F.mse_loss(scores.flatten(2), F.one_hot(best, h * w).float() * visible[..., None])
    own, theirs = PIPHead.read_cells(offsets, neighbour_offsets, best)
    direction, weight = point_frames(points.detach(), outline, along_weight)
    own_loss = anisotropic_l1(own - (points - cell), direction, weight)
    neighbour_loss = anisotropic_l1(theirs - (points[:, neighbour_index] - cell[:, :, None]),
                                    direction[:, neighbour_index], weight[neighbour_index])
    return PIP_SCORE_WEIGHT * score_loss + 2 * (own_loss + neighbour_loss)  # x and y each count once, as in PIPNet


def make_loss(args: argparse.Namespace, model: nn.Module, markup: Markup | None = None) -> tuple[Callable, Callable]:
    """The training loss, and the validation loss on the decoded coordinates (the same for the regression
    head; L1 for the pip head, whose training loss needs the raw maps). --along-weight takes the outlines of
    `markup`."""
    if args.head == "pip":
        index = model.head.neighbour_index
        outline = outline_chords(markup) if markup is not None and args.along_weight != 1 else None
        return (lambda outputs, targets: pip_loss(outputs, targets, index, outline, args.along_weight)), F.l1_loss
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
    known, and raises DataError in one line when the flags do not fit K points."""
    pairs = args.flip_pairs and [tuple(p) for p in args.flip_pairs]
    return lambda num_points: markup_for(num_points, pairs, args.nme_points)


def make_loaders(args: argparse.Namespace, rank: int,
                 world: int) -> tuple[DataLoader, DataLoader, DistributedSampler, Markup]:
    """The loaders, and the labels' markup: its point count read from them, the rest from the flags, and
    where dlib's box lies around its points fitted on the training faces (for video tracking)."""
    xml = Path(args.data_dir) / args.xml
    markup_of = markup_from_flags(args)
    faces = load_faces(xml, args.skip_bad, markup_of=markup_of)
    markup = markup_of(len(faces[0].points))
    if args.flip and markup.flip is None:
        raise UsageError(f"--flip: {xml} has {markup.num_points} points, and which is the mirror twin of which "
                         f"is known only for iBUG's 68; give --flip-pairs (\"0,3 1,2\" or a JSON file), or --no-flip")
    train_idx, val_idx = split_faces(len(faces), args.val_fraction, args.seed)
    if not train_idx or not val_idx:
        raise UsageError(f"{xml}: --val-fraction {args.val_fraction:g} of {len(faces)} faces leaves {len(train_idx)} "
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
                          flip_permutation=markup.flip, occlusion=args.occlusion,
                          visibility=args.covered_scores, align=markup if args.align else None,
                          spread=args.jitter_spread, occlusion_fill=args.occlusion_fill)
    train_set = FaceLandmarksDataset(faces, train_tf, train_idx, cache)
    val_set = FaceLandmarksDataset(faces, Transforms(args.img_size, train=False), val_idx, cache)
    generator = torch.Generator().manual_seed(args.seed)
    sampler = DistributedSampler(train_set, world, rank, seed=args.seed) if world > 1 else None
    mixed, labelled = None, len(train_set)
    if args.unlabelled:
        taught = taught_set(args, faces, val_idx, markup, train_tf, rank, world)
        mixed = MixedSampler(labelled, len(taught), args.unlabelled_share, generator, rank, world)
        train_set, sampler = WithTaught(train_set, taught), None
    common = dict(num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=args.workers > 0)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None and mixed is None,
                              sampler=sampler or mixed, drop_last=labelled > args.batch_size,
                              generator=generator, **common)
    val_loader = DataLoader(val_set, args.val_batch_size, **common)
    return train_loader, val_loader, sampler, markup


def taught_set(args: argparse.Namespace, faces: list[Face], val_idx: list[int], markup: Markup,
               transform: Transforms, rank: int, world: int) -> FaceLandmarksDataset:
    """--unlabelled: the faces the teacher labelled in those folders, cropped as the training faces are. Rank 0
    labels them; the other ranks wait, then find every photo labelled."""
    if markup.num_points != IBUG.num_points:
        raise UsageError(f"--unlabelled: the teacher puts iBUG's {IBUG.num_points} points, and these labels have "
                         f"{markup.num_points}")
    folder = (cache_dir() or Path(args.out)) / "teacher"
    held_out = {faces[i].image.resolve() for i in val_idx}
    weights = Path(args.teacher) if args.teacher else RELEASED_WEIGHTS
    xml = None
    for turn in ((0,) if world == 1 else (0, 1)):
        if (rank == 0) == (turn == 0):
            xml = teach(args.unlabelled, weights, folder, faces, held_out, args.device, show=rank == 0)
        if world > 1:
            dist.barrier()
    taught = load_faces(xml, skip_bad=True, markup_of=lambda k: markup)
    cache = FaceCache(taught, xml, round(args.img_size * CACHE_EXTENT), CROP_MARGIN, os.cpu_count() or 1) \
        if args.cache else None
    return FaceLandmarksDataset(taught, transform, None, cache)


class WithTaught(ConcatDataset):
    """The labelled training faces, then the teacher's. `faces` and `indices` are the labelled ones': the split,
    its fingerprint and the mean shape come from them alone."""

    def __init__(self, labelled: FaceLandmarksDataset, taught: FaceLandmarksDataset):
        super().__init__([labelled, taught])
        self.faces, self.indices, self.taught = labelled.faces, labelled.indices, taught


class MixedSampler(Sampler):
    """--unlabelled-share: each epoch is as many crops as there are labelled training faces, that share of them
    the teacher's (drawn without repeats where there are enough), the rest labelled ones, shuffled together.
    So an epoch costs the same with or without taught faces, and runs compare at equal crops. Every rank draws
    the same order from the loader's generator (seeded per epoch) and takes its own slice of it, the order
    padded to a whole number of slices, as DistributedSampler pads, so every rank runs as many steps."""

    def __init__(self, labelled: int, taught: int, share: float, generator: torch.Generator, rank: int = 0,
                 world: int = 1):
        self.labelled, self.taught, self.share = labelled, taught, share
        self.generator, self.rank, self.world = generator, rank, world

    def __len__(self) -> int:
        return -(-self.labelled // self.world)

    def __iter__(self):
        n_taught = round(self.labelled * self.share)
        g = self.generator
        own = torch.randperm(self.labelled, generator=g)[:self.labelled - n_taught]
        draw = torch.randperm(self.taught, generator=g)[:n_taught] if n_taught <= self.taught \
            else torch.randint(self.taught, (n_taught,), generator=g)
        order = torch.cat([own, self.labelled + draw])[torch.randperm(self.labelled, generator=g)]
        order = torch.cat([order, order[:len(self) * self.world - self.labelled]])
        return iter(order[self.rank::self.world].tolist())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """Python's, numpy's and torch's random states, as plain lists and tensors (weights_only loads them): what
    the augmentation draws next, saved with each epoch so that --resume draws what the run would have."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {"python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
            "numpy": [kind, keys.tolist(), position, has_gauss, gauss], "torch": torch.get_rng_state()}


def restore_rng(states: dict) -> None:
    internal, version, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])


def finite_on_every_rank(loss: float, device: torch.device) -> bool:
    """Whether every process's loss is finite. All ranks must leave the epoch at the same step: one that
    stopped alone would leave the others waiting in the next gradient all-reduce for ever."""
    if not (dist.is_available() and dist.is_initialized()):
        return math.isfinite(loss)
    flag = torch.tensor([float(math.isfinite(loss))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, device, amp: str, desc: str,
                    show: bool) -> tuple[float, float]:
    """Mean training loss, and images per second over the epoch (loading included)."""
    model.train()
    total, count, started = 0.0, 0, time.time()
    bar = tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            loss = loss_fn(model(images), targets)
        if not finite_on_every_rank(loss.item(), device):
            return math.nan, count / (time.time() - started)  # diverged: the caller stops the run, saving nothing
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total, count = total + loss.item() * len(images), count + len(images)
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
    save_figure(fig, path)
    plt.close(fig)
