"""The training recipes: the write-up's defaults, the measured presets, and which settings fix a run so that --resume must keep them."""
import argparse
from typing import NamedTuple

from checkpoints import NetworkConfig


class Setting(NamedTuple):
    """One setting of a run: its default (the write-up's), whether changing it leaves the write-up's recipe (a
    run that does keeps its best checkpoint by NME), and whether --resume must keep it (it fixes the split,
    what the weights are, the optimiser's state or what the validation loss and NME mean). Every other
    setting given on --resume wins, including those whose values also live in the optimiser's and schedule's
    state (lr, weight_decay, epochs, sched, warmup_epochs, batch_size), which train.load_training_state writes
    in after loading, --amp, which takes effect from the next step, and --select, whose best score is read
    again from the log. A new setting is fixed unless it can take effect so."""
    default: object
    leaves_writeup: bool = False
    fixed: bool = False


N = NetworkConfig  # the network's and the split's defaults live there, where checkpoints are read
# Every setting of a run, once: what `python train.py` runs when no flag says otherwise is the write-up's recipe.
SETTINGS = {
    "data_dir": Setting(N.data_dir), "xml": Setting(N.xml), "epochs": Setting(10), "batch_size": Setting(64),
    "val_batch_size": Setting(8), "lr": Setting(1e-4), "seed": Setting(N.seed, fixed=True), "workers": Setting(2),
    "device": Setting("auto"), "out": Setting("runs"), "resume": Setting(None), "cache": Setting(False),
    "skip_bad": Setting(N.skip_bad), "val_fraction": Setting(N.val_fraction, fixed=True),
    "flip_pairs": Setting(None, fixed=True), "nme_points": Setting(None, fixed=True),
    "recipe": Setting("writeup", True, True), "img_size": Setting(N.img_size, True, True),
    "rotation": Setting(10.0, True), "scale": Setting(0.0, True), "shift": Setting(0.0, True),
    "flip": Setting(False, True), "occlusion": Setting(0.0, True), "covered_scores": Setting(False, True),
    "align": Setting(False, True), "jitter_spread": Setting("uniform", True), "occlusion_fill": Setting("noise", True),
    "loss": Setting("mse", True, True), "optimizer": Setting("adam", True, True), "weight_decay": Setting(0.0, True),
    "sched": Setting("none", True), "warmup_epochs": Setting(0, True), "pretrained": Setting(False, True, True),
    "init": Setting(None, True, True), "select": Setting(None), "amp": Setting("auto"),
    "head": Setting(N.head, True, True), "features": Setting(N.features, True, True),
    "unlabelled": Setting(None, True, True), "unlabelled_share": Setting(0.5), "teacher": Setting(None, fixed=True),
    "along_weight": Setting(1.0, True),
}
DEFAULTS = {name: s.default for name, s in SETTINGS.items()}
# Changing any of these leaves the write-up's recipe, and then checkpoints are compared by NME.
RECIPE_KEYS = [name for name, s in SETTINGS.items() if s.leaves_writeup]
# With --resume these must equal the checkpoint's (Setting says why).
RESUME_FIXED = [name for name, s in SETTINGS.items() if s.fixed]


# Measured on the 300-W subset (docs/results.md); explicit flags still override these.
RECIPES = {
    "writeup": {},
    "best": dict(head="pip", img_size=160, epochs=96, batch_size=32, lr=1e-3, optimizer="adamw",
                 weight_decay=1e-4, sched="cosine", warmup_epochs=1, loss="wing", flip=True, scale=0.1,
                 shift=0.05, rotation=15.0, cache=True),
}
# The released weights' run (docs/training.md, "Trained weights"): the best recipe on stride-16 features, with
# noise and pieces of the face itself over half the crops, and the scores of covered points trained towards 0
# so that each point's score says whether it is seen. The release continued these 96 epochs to
# RELEASE_EPOCHS with `--resume --epochs 176`, a warm restart that a preset cannot say; then two runs went on
# from those weights with `--init` (RELEASE_RESTARTS: each a fresh AdamW and cosine schedule), and the release
# is the three averaged by soup.py. The docs give every command.
RECIPES["release"] = RECIPES["best"] | dict(features="stride16", occlusion=0.5, occlusion_fill="mixed",
                                            covered_scores=True)
RELEASE_EPOCHS = 176
RELEASE_RESTARTS = [dict(lr=3e-4, epochs=160), dict(lr=4e-4, epochs=100)]


# What a checkpoint needs to resume from; best.pt holds only the weights, settings and scores.
RESUME_KEYS = ["model", "optimizer", "scheduler", "epoch", "best", "history", "config"]


def resolve(given: dict, saved: dict | None = None) -> argparse.Namespace:
    """The settings of a run: flags given now beat the checkpoint's (`saved`, on --resume), which beat the
    recipe's, which beat DEFAULTS. --select, unless given, follows whether the run leaves the write-up."""
    config = dict(DEFAULTS)
    config.update(RECIPES[given.get("recipe", DEFAULTS["recipe"])])
    config.update(saved or {})
    config.update(given)
    if config["select"] is None:
        beyond = any(config[k] != DEFAULTS[k] for k in RECIPE_KEYS)
        config["select"] = "nme" if beyond else "loss"
    return argparse.Namespace(**config)
