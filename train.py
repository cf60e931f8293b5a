"""The training loop: the write-up's recipe unless flags or --recipe say otherwise; per-epoch log, atomic checkpoints (last.pt and best.pt), exact --resume, and DDP under torchrun."""
import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from checkpoints import NetworkConfig, imagenet_weights, load_checkpoint, misfit, save_checkpoint, save_or_warn
from dataset import labels_fingerprint
from errors import DataError, Error, UsageError, WeightsError
from flags import SEED_MAX, WORKERS_MAX, flip_pairs_arg, number_in, one_line_errors, out_folder, point_pair_arg
from landmarks import Markup
from model import FEATURES, HEADS, MAX_IMG_SIZE, MIN_IMG_SIZE, build_model, features_misfit
from recipes import DEFAULTS, RECIPES, RESUME_FIXED, RESUME_KEYS, resolve
from runtime import AMP_CHOICES, resolve_amp
from training import (make_loaders, make_loss, make_optimizer, make_scaler, make_scheduler, plot_curves,
                      restore_rng, rng_states, seed_everything, setup_distributed, train_one_epoch, validate,
                      write_log)
from transforms import CROP_MARGIN, mean_shape

try:
    import fcntl
except ImportError:  # Windows: two runs on one --out are not guarded there
    fcntl = None

LOCK_NAME = ".lock"


def add_data_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--data-dir", help=f"folder holding dlib's XML and images (default: {d['data_dir']})")
    p.add_argument("--xml", help=f"labels file inside --data-dir (default: {d['xml']})")
    p.add_argument("--epochs", type=number_in(int, 1), help=f"epochs to train (default: {d['epochs']})")
    p.add_argument("--batch-size", type=number_in(int, 1), help=f"training batch size (default: {d['batch_size']})")
    p.add_argument("--val-batch-size", type=number_in(int, 1),
                   help=f"validation batch size (default: {d['val_batch_size']})")
    p.add_argument("--lr", type=number_in(float, 0, low_open=True), help=f"learning rate (default: {d['lr']})")
    p.add_argument("--seed", type=number_in(int, 0, SEED_MAX),
                   help=f"seed for the split, the augmentation and the init (default: {d['seed']})")
    p.add_argument("--workers", type=number_in(int, 0, WORKERS_MAX),
                   help=f"data-loading processes (default: {d['workers']})")
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


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="preset: writeup (default), best (an hour's run) or release (the released weights' run); "
                        "flags override it")
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
    p.add_argument("--align", action=argparse.BooleanOptionalAction,
                   help="crop each training face in the level frame its points give it (turned by its eye line, "
                        "framed by the markup's box relation), as inference crops from a detector's roll or an "
                        "earlier look, before --rotation, --scale and --shift jitter it (default: off)")
    p.add_argument("--jitter-spread", choices=["uniform", "normal"],
                   help="how --rotation, --scale and --shift are drawn: uniform over +-value, or normal with sigma "
                        "value/2, so most crops lie near the frame and a few far off (default: uniform)")
    p.add_argument("--occlusion-fill", choices=["noise", "mixed"],
                   help="what covers --occlusion's rectangle: noise, or mixed: half the time a piece of the crop "
                        "itself from elsewhere (hair, background, another part of the face) (default: noise)")
    p.add_argument("--covered-scores", action=argparse.BooleanOptionalAction,
                   help="with --occlusion and the pip head: the points under the noise rectangle are taught a flat "
                        "score map, so each point's score says whether it is seen (default: off)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flip (default: off); needs --flip-pairs unless the labels are iBUG's 68")
    p.add_argument("--flip-pairs", type=flip_pairs_arg, metavar="PAIRS",
                   help="which point mirrors which: a JSON file [[i, j], ...] or \"0,3 1,2\" (default: iBUG's "
                        "twins for 68 points, none otherwise)")
    p.add_argument("--nme-points", type=point_pair_arg, metavar="I,J",
                   help="the two points whose distance normalises NME (default: the outer eye corners 36,45 for "
                        "68 points; otherwise NME is normalised by the box diagonal)")
    p.add_argument("--loss", choices=["mse", "l1", "smoothl1", "wing"], help="loss (default: mse)")
    p.add_argument("--along-weight", type=number_in(float, 0),
                   help="with the pip head: how much an outline point's offset error along its outline (the jaw, "
                        "the brows) weighs against the error across it; below 1 spares the labels' uncertainty "
                        "along the outline, as ADNet's anisotropic loss (default: 1, plain L1)")
    p.add_argument("--optimizer", choices=["adam", "adamw"], help="optimiser (default: adam)")
    p.add_argument("--weight-decay", type=number_in(float, 0), help="weight decay (default: 0)")
    p.add_argument("--sched", choices=["none", "cosine"], help="learning-rate schedule (default: none)")
    p.add_argument("--warmup-epochs", type=number_in(int, 0), help="linear warm-up before the cosine (default: 0)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction,
                   help="start from torchvision's ImageNet weights (needs internet once; default: off)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="start from these weights (a best.pt, a last.pt or weights/resnet18_300w_68.pt) with a "
                        "fresh optimiser and schedule: to fine-tune them, or to go on from a run whose last.pt is "
                        "gone (default: from scratch)")
    p.add_argument("--head", choices=list(HEADS),
                   help="regression: the write-up's 136-value fc (default); pip: PIPNet's score maps and offsets")
    p.add_argument("--features", choices=list(FEATURES),
                   help="what the pip head reads: stride32, layer4 as it is (5x5 cells at 160 px); stride16, layer4 "
                        "without its downsampling (10x10, 1.8x the compute); stride16-up, layer4 upsampled onto "
                        "layer3 (10x10, 1.08x) (default: stride32)")
    p.add_argument("--unlabelled", nargs="+", metavar="DIR",
                   help="also train on the faces found in these folders of photos (and below), labelled by a teacher: "
                        "--teacher's network with a mirror look and two looks, averaged with dlib's 68-point model "
                        "where it is installed; faces the two disagree on are left out (teacher.py; "
                        "docs/training.md) (default: none)")
    p.add_argument("--unlabelled-share", type=number_in(float, 0, 1),
                   help=f"with --unlabelled: the share of each epoch's crops that are the teacher's faces; an epoch "
                        f"stays as many crops as there are labelled training faces (default: {d['unlabelled_share']})")
    p.add_argument("--teacher", metavar="WEIGHTS",
                   help="with --unlabelled: the weights that label the faces (default: the released weights)")
    p.add_argument("--amp", choices=list(AMP_CHOICES),
                   help="bf16 autocast: auto uses it where the device does bf16 in hardware (default: auto)")
    p.add_argument("--select", choices=["loss", "nme"],
                   help="keep the weights with the best validation loss or NME (default: loss for the "
                        "write-up's recipe, nme as soon as any flag beyond it is used)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags given on the command line beat the checkpoint's (on --resume), which beat the recipe's,
    which beat DEFAULTS (recipes.resolve)."""
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS)
    add_data_flags(p)
    add_recipe_flags(p)
    given = vars(p.parse_args(argv))
    saved = None
    if given.get("resume") is not None:
        given["resume"] = given["resume"] or str(Path(given.get("out", DEFAULTS["out"])) / "last.pt")
        with one_line_errors():
            saved = resumable_checkpoint(given["resume"])
        check_resume_flags(p, given, saved)
    args = resolve(given, saved and saved["config"])
    if args.jitter_spread == "normal" and args.scale >= 0.5:
        p.error(f"argument --scale: {args.scale:g} with --jitter-spread normal can draw a zoom of "
                f"{1 - 2 * args.scale:g} or less (draws reach twice the value); pass below 0.5")
    if args.covered_scores and (args.head != "pip" or not args.occlusion):
        p.error("argument --covered-scores: needs --head pip (whose score maps it teaches) and --occlusion above 0 "
                "(the covered points it teaches them on)")
    for flag in ("unlabelled_share", "teacher"):
        if flag in given and not args.unlabelled:
            p.error(f"argument --{flag.replace('_', '-')}: goes with --unlabelled, whose faces it is about")
    if args.init is not None and args.pretrained:
        p.error("argument --init: the weights to start from are either these or ImageNet's; drop --pretrained")
    if args.along_weight != 1 and args.head != "pip":
        p.error("argument --along-weight: weighs the pip head's offsets; pass --head pip")
    if problem := features_misfit(args.head, args.features):
        p.error(f"argument --features: {problem}; pass --head pip")
    if args.sched == "cosine" and args.warmup_epochs >= args.epochs:
        p.error(f"argument --warmup-epochs: {args.warmup_epochs} leaves no epoch of the cosine in {args.epochs} "
                f"epochs; pass fewer than --epochs")
    return args


def check_resume_flags(p: argparse.ArgumentParser, given: dict, checkpoint: dict) -> None:
    """argparse's one-line error for a flag that would change what the resumed run is, or an --epochs
    that leaves nothing to train."""
    config = dict(DEFAULTS) | RECIPES[given.get("recipe", DEFAULTS["recipe"])]
    for key in RESUME_FIXED:
        saved = checkpoint["config"].get(key, config[key])
        if key in given and given[key] != saved:
            p.error(f"argument --{key.replace('_', '-')}: {given[key]} differs from {saved} in "
                    f"{given['resume']}, and it fixes the run; resume without it, or start a new run "
                    f"with another --out")
    epochs = given.get("epochs", checkpoint["config"].get("epochs", config["epochs"]))
    if epochs <= checkpoint["epoch"]:
        p.error(f"argument --epochs: {given['resume']} has trained {checkpoint['epoch']} epochs of "
                f"{epochs}; pass --epochs above {checkpoint['epoch']} to go on")


def resumable_checkpoint(path: str) -> dict:
    """A checkpoint --resume can continue from, or one line saying why not and what to pass instead."""
    checkpoint = load_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        last = Path(path).parent / "last.pt"
        instead = (f"pass --resume {last}" if last.is_file() and last.resolve() != Path(path).resolve()
                   else "start a new run without --resume")
        raise WeightsError(f"{path}: holds no {', '.join(missing)}, so training cannot resume from it (best.pt "
                           f"keeps only the weights, last.pt the whole state); {instead}")
    return checkpoint


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


def check_labels(checkpoint: dict, labels: str, args: argparse.Namespace) -> None:
    """Other labels than the checkpoint's would silently draw another split: stop, unless the user says so."""
    saved = checkpoint.get("labels_sha256")
    if saved is None:
        print(f"note: {args.resume} records no fingerprint of its labels (older train.py); they are not checked",
              file=sys.stderr)
    elif saved != labels and not args.allow_changed_labels:
        raise DataError(f"{Path(args.data_dir) / args.xml}: the labels differ from those {args.resume} was trained "
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
    raise Error(f"epoch {epoch}: the {which} loss became {loss}, the run diverged; {kept}; "
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
            raise UsageError(f"{out}: another train.py ({holder}) is writing to this folder; wait for it to "
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

def new_model(args: argparse.Namespace, train_loader, markup: Markup, labels: str, device: torch.device) -> nn.Module:
    """The network to train: from scratch, ImageNet or --init; the pip head's neighbours from the training faces."""
    model = build_model(args.head, markup.num_points, imagenet_weights() if args.pretrained else None, args.features)
    if args.head == "pip":  # each landmark's neighbours, from the training faces' mean shape
        train_set = train_loader.dataset
        model.head.set_neighbours(torch.from_numpy(mean_shape([train_set.faces[i] for i in train_set.indices])))
    if args.init is not None:
        start_from(model, args, markup, labels)
    return model.to(device).to(memory_format=torch.channels_last)


def start_from(model: nn.Module, args: argparse.Namespace, markup: Markup, labels: str) -> None:
    """--init: the weights of another run loaded into `model`, or WeightsError in one line when they are another
    network; a warning when they may have trained on this run's validation faces, a note when that cannot be told."""
    checkpoint = load_checkpoint(args.init)
    config = NetworkConfig.of(checkpoint)
    theirs = config.network()
    ours = {"head": args.head, "features": args.features, "points": markup.num_points}
    other = "; ".join(f"{key} {theirs[key]} against {ours[key]}" for key in ours if theirs[key] != ours[key])
    if problem := other or misfit(model, checkpoint["model"]):
        raise WeightsError(f"{args.init}: not weights of the network this run trains ({problem}); pass --head and "
                           f"--features as they were trained, and labels of the same markup")
    model.load_state_dict(checkpoint["model"])
    other_split = any(getattr(config, key) != getattr(args, key) for key in ("seed", "val_fraction", "xml"))
    saved = checkpoint.get("labels_sha256")
    if other_split or saved not in (None, labels):
        print(f"warning: {args.init} was trained on another split or other labels, so this run's validation "
              f"faces may be among its training faces and the validation NME too low", file=sys.stderr)
    elif saved is None:
        print(f"note: {args.init} records no fingerprint of its labels, so whether it trained on this run's "
              f"validation faces is not checked", file=sys.stderr)


def resume_into(args: argparse.Namespace, model, optimizer, scheduler, labels: str, steps_per_epoch: int,
                device: torch.device) -> tuple[list[dict], float, int, dict | None]:
    """The history, the best score and the epochs done of the checkpoint, its weights and optimiser state
    loaded into `model`, `optimizer` and `scheduler`."""
    checkpoint = load_checkpoint(args.resume, device)
    check_labels(checkpoint, labels, args)
    model.load_state_dict(checkpoint["model"])
    load_training_state(optimizer, scheduler, checkpoint, args, steps_per_epoch)
    history, best = checkpoint["history"], checkpoint["best"]
    if args.select != checkpoint["config"].get("select"):  # the best so far by the figure chosen now
        best = min(row["val_nme" if args.select == "nme" else "val_loss"] for row in history)
    return history, best, checkpoint["epoch"], checkpoint.get("rng")


def describe(args: argparse.Namespace, train_loader, val_loader, markup, device: torch.device, amp: str) -> str:
    taught = getattr(train_loader.dataset, "taught", None)
    return (f"{len(train_loader.dataset.indices)} training and {len(val_loader.dataset)} validation faces of "
            f"{markup.num_points} points (NME over the {markup.normalisation}); "
            + (f"{len(taught)} faces the teacher labelled, {args.unlabelled_share:.0%} of each epoch's crops; "
               if taught is not None else "") +
            f"device {device}; {args.head} head; precision {'bf16 autocast' if amp == 'bf16' else 'fp32'} "
            f"(--amp {args.amp}); keeping the best validation {args.select}")


def refuse_earlier_run(out: Path, resume: str | None) -> None:
    """UsageError when OUT holds another run's weights, which this run would replace: a new run, or one
    resumed from a checkpoint in another folder."""
    if resume and Path(resume).resolve().parent == out.resolve():
        return
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            raise UsageError(f"{out / name}: another run's weights are there; pass --resume to go on with that run, "
                             f"or another --out")


class Run:
    """Everything one training run holds: the data, the network and its optimiser, and where it stands."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rank, self.world, self.device = setup_distributed(args)
        seed_everything(args.seed + self.rank)
        self.show, self.out = self.rank == 0, Path(args.out)
        if self.show:
            self.out.mkdir(parents=True, exist_ok=True)
        self.train_loader, self.val_loader, self.sampler, self.markup = make_loaders(args, self.rank, self.world)
        self.labels = labels_fingerprint(self.train_loader.dataset.faces, (Path(args.data_dir) / args.xml).parent)
        self.model = new_model(args, self.train_loader, self.markup, self.labels, self.device)
        self.optimizer = make_optimizer(args, self.model)
        self.scheduler = make_scheduler(args, self.optimizer, len(self.train_loader))
        self.amp = resolve_amp(args.amp, self.device)
        self.scaler = make_scaler(self.device, self.amp)
        self.loss_fn, self.val_loss_fn = make_loss(args, self.model, self.markup)
        self.history, self.best, self.start, self.rng = [], math.inf, 0, None
        if args.resume:
            self.history, self.best, self.start, self.rng = resume_into(
                args, self.model, self.optimizer, self.scheduler, self.labels, len(self.train_loader), self.device)
            if self.show:
                print(f"resumed from {args.resume} after epoch {self.start}")
        self.trained = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.config = vars(args) | {"margin": CROP_MARGIN, "precision": self.amp, "markup": self.markup.to_config()}
        self.saved = self.start  # epochs held by the last.pt on disk
        if self.rng is not None:  # last of all: building the run above drew random numbers too
            restore_rng(self.rng)

    def state(self, epoch: int, scores: dict | None = None) -> dict:
        """What last.pt holds after `epoch`: enough to go on exactly as if the run had never stopped."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "best": self.best,
                "history": self.history, "config": self.config, "labels_sha256": self.labels, "rng": self.rng,
                **(scores or {})}

    def epoch(self, epoch: int) -> dict:
        """Train and validate one epoch; stops the run if either loss diverged."""
        args, started = self.args, time.time()
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self.train_loader.generator.manual_seed(args.seed + epoch)
        train_loss, img_s = train_one_epoch(self.trained, self.train_loader, self.loss_fn, self.optimizer,
                                            self.scheduler, self.scaler, self.device, self.amp,
                                            f"epoch {epoch + 1}/{args.epochs}", self.show)
        stop_if_diverged(train_loss, "training", epoch + 1, self.saved, args)
        val_loss, val_nme = validate(self.model, self.val_loader, self.val_loss_fn, self.device, self.amp, self.markup)
        stop_if_diverged(val_loss, "validation", epoch + 1, self.saved, args)
        return dict(epoch=epoch + 1, train_loss=round(train_loss, 6), val_loss=round(val_loss, 6),
                    val_nme=round(val_nme, 3), lr=self.optimizer.param_groups[0]["lr"],
                    seconds=round(time.time() - started, 1), train_img_s=round(img_s, 1))

    def keep(self, row: dict, val_loss: float, val_nme: float) -> None:
        """Rank 0: best.pt when this epoch is the best, last.pt always, the log, and one line."""
        score = val_nme if self.args.select == "nme" else val_loss
        is_best = score < self.best
        self.best = min(self.best, score)
        save_checkpoint(self.state(row["epoch"], {"val_loss": val_loss, "val_nme": val_nme}), is_best, self.out)
        self.saved = row["epoch"]
        write_log(self.history, self.out)
        print(f"epoch {row['epoch']}/{self.args.epochs}  train_loss {row['train_loss']:.5f}  val_loss "
              f"{val_loss:.5f}  val_nme {val_nme:.2f}%  {row['train_img_s']:.0f} img/s  {row['seconds']:.0f}s"
              f"{'  *' if is_best else ''}", flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    r = Run(args)
    if r.show:
        print(describe(args, r.train_loader, r.val_loader, r.markup, r.device, r.amp))
    try:
        for epoch in range(r.start, args.epochs):
            row = r.epoch(epoch)
            r.rng = rng_states()  # as the next epoch will find them
            r.history.append(row)
            if r.show:
                r.keep(row, row["val_loss"], row["val_nme"])
    except KeyboardInterrupt:
        if r.show:
            report_interrupt(r.state, len(r.history), r.saved, r.out)
        raise SystemExit(130)
    if r.show and r.history:
        plot_curves(r.history, r.out / "curves.png")
        print(f"best validation {args.select}: {r.best:.5g}; weights in {r.out / 'best.pt'}, "
              f"log in {r.out / 'log.csv'}, curves in {r.out / 'curves.png'}")
    if r.world > 1:
        dist.destroy_process_group()
    return r.history


def main(args: argparse.Namespace) -> list[dict]:
    """The run, holding --out against a second run there (rank 0 only: the other ranks write nothing)."""
    first = int(os.environ.get("RANK", 0)) == 0
    with one_line_errors(quiet=not first), hold_folder(Path(args.out)) if first else nullcontext():
        if first:
            refuse_earlier_run(Path(args.out), args.resume)
        return run(args)


if __name__ == "__main__":
    main(parse_args())
