"""The training recipes: the write-up's defaults, the measured presets, and which settings fix a run so that --resume must keep them."""
import argparse

from labels import TRAIN_XML

# The write-up's recipe: what `python train.py` runs when no flag says otherwise.
DEFAULTS = dict(data_dir="data", xml=TRAIN_XML, epochs=10, batch_size=64, val_batch_size=8, lr=1e-4, seed=0,
                workers=2, device="auto", out="runs", resume=None, cache=False, skip_bad=False, val_fraction=0.1,
                flip_pairs=None, nme_points=None,
                recipe="writeup", img_size=224, rotation=10.0, scale=0.0, shift=0.0, flip=False, occlusion=0.0,
                covered_scores=False, align=False, jitter_spread="uniform",
                occlusion_fill="noise", loss="mse", optimizer="adam", weight_decay=0.0, sched="none", warmup_epochs=0, pretrained=False, init=None,
                select=None, amp="auto", head="regression", features="stride32")


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


# Changing any of these leaves the write-up's recipe, and then checkpoints are compared by NME.
RECIPE_KEYS = ["img_size", "rotation", "scale", "shift", "flip", "occlusion", "occlusion_fill", "covered_scores",
               "align", "jitter_spread", "loss", "optimizer", "weight_decay", "sched", "warmup_epochs", "pretrained", "init",
               "recipe", "head", "features"]


# With --resume these flags must equal the checkpoint's, because they fix the split (seed, val_fraction),
# what the weights are (img_size, pretrained, init, head, features), the optimiser's state (optimizer) or what the validation
# loss and NME mean (loss, recipe, flip_pairs, nme_points). Every other flag given now wins, including those whose values also live in the
# optimiser's and schedule's state (lr, weight_decay, epochs, sched, warmup_epochs, batch_size), which
# load_training_state writes in after loading, --amp, which takes effect from the next step, and --select,
# whose best score is read again from the log. A new flag goes here unless it can take effect so.
RESUME_FIXED = ["seed", "val_fraction", "img_size", "pretrained", "init", "head", "features", "optimizer", "loss", "recipe",
                "flip_pairs", "nme_points"]


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
