"""Runs fine-tuned from the same weights, averaged into one network (a model soup): each ingredient and the soup scored on the validation split, the soup written as a best.pt."""
import argparse
import sys
from pathlib import Path

import torch

from checkpoints import NetworkConfig, load_checkpoint, model_from, save_atomic
from dataset import labels_fingerprint
from errors import UsageError, WeightsError
from flags import WORKERS_MAX, number_in, one_line_errors, out_file, refuse_input_as_output
from recipes import resolve
from runtime import resolve_amp
from training import make_loaders, make_loss, validate

# Settings that fix which faces are the validation faces: ingredients must agree on them, or the soup's score
# would count faces some ingredient trained on. img_size too: the weights fit any size, but mean one.
SPLIT_KEYS = ("seed", "val_fraction", "xml", "img_size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("weights", nargs="+", type=Path,
                        help="two or more weights files (best.pt, last.pt or a release) of runs that started from "
                             "the same weights, such as the release and `train.py --init` runs from it")
    parser.add_argument("--out", type=out_file, default=Path("runs/soup.pt"),
                        help="the averaged weights, as a best.pt (default: runs/soup.pt)")
    parser.add_argument("--data-dir", type=Path,
                        help="dlib folder of the validation faces (default: the first ingredient's --data-dir)")
    parser.add_argument("--workers", type=number_in(int, 0, WORKERS_MAX), default=2,
                        help="data-loading processes for scoring (default: 2)")
    return parser.parse_args(argv)


def check_ingredients(paths: list[Path], checkpoints: list[dict]) -> None:
    """WeightsError in one line, naming the file, for an ingredient of another network or another split."""
    first = NetworkConfig.of(checkpoints[0])
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        config = NetworkConfig.of(checkpoint)
        theirs, ours = config.network(), first.network()
        differ = [f"{k} {theirs[k]} against {ours[k]}" for k in ours if theirs[k] != ours[k]]
        differ += [f"{k} {getattr(config, k)} against {getattr(first, k)}" for k in SPLIT_KEYS
                   if getattr(config, k) != getattr(first, k)]
        if differ:
            raise WeightsError(f"{path}: not the network or split of {paths[0]} ({'; '.join(differ)}); a soup "
                               f"averages runs of one network trained on one split")
        mine, base = checkpoint["model"], checkpoints[0]["model"]
        for key in base.keys() | mine.keys():
            if key not in mine or key not in base or mine[key].shape != base[key].shape:
                raise WeightsError(f"{path}: its weights do not fit {paths[0]}'s (first: {key})")
            # Integer buffers other than batch norm's step counters (the pip head's neighbours) must be equal:
            # averaged, they would name no point.
            if not base[key].is_floating_point() and not key.endswith("num_batches_tracked") \
                    and not torch.equal(mine[key], base[key]):
                raise WeightsError(f"{path}: its {key} differs from {paths[0]}'s; a soup averages runs that "
                                   f"started from the same weights")


def average(states: list[dict]) -> dict:
    """The mean of each floating tensor, in fp32 (a release's fp16 too); other tensors (counters, the pip
    head's neighbour indices, equal in all by check_ingredients) from the first. Batch-norm statistics are
    averaged as well: estimating them again on augmented training crops scored 0.016 worse (docs/results.md)."""
    return {key: torch.stack([s[key].float() for s in states]).mean(0) if value.is_floating_point() else value
            for key, value in states[0].items()}


def fingerprint_note(paths: list[Path], checkpoints: list[dict], labels: str) -> str | None:
    """A warning when an ingredient trained on other labels than those scored now (its training faces may be
    among the validation faces); None when every recorded fingerprint agrees."""
    other = [str(p) for p, c in zip(paths, checkpoints) if c.get("labels_sha256") not in (None, labels)]
    if other:
        return (f"warning: {', '.join(other)} trained on other labels than these, so the validation faces may be "
                f"among their training faces and the scores below too low")
    return None


def score(paths: list[Path], checkpoints: list[dict], soup: dict, args: argparse.Namespace) -> tuple[list, str]:
    """(validation loss, NME %) of each ingredient and then of the soup, as train.py measures them; and the
    fingerprint of the labels they were scored on."""
    config = checkpoints[0].get("config", {})
    # The crop cache as the run had it (its log's figures); the validation faces alone, no teacher's faces.
    given = {"workers": args.workers, "device": "cpu", "unlabelled": None}
    if args.data_dir is not None:
        given["data_dir"] = str(args.data_dir)
    run = resolve(given, config)
    _, val_loader, _, markup = make_loaders(run, 0, 1)
    points = NetworkConfig.of(checkpoints[0]).markup.num_points
    if markup.num_points != points:
        raise WeightsError(f"{Path(run.data_dir) / run.xml}: its faces have {markup.num_points} points, but the "
                           f"weights are for {points}")
    labels = labels_fingerprint(val_loader.dataset.faces, (Path(run.data_dir) / run.xml).parent)
    cpu = torch.device("cpu")
    amp = resolve_amp("auto", cpu)
    scores = []
    for path, checkpoint in [*zip(paths, checkpoints), ("soup", {"model": soup, "config": config})]:
        model = model_from(checkpoint, path)
        scores.append(validate(model, val_loader, make_loss(run, model)[1], cpu, amp, markup))
    return scores, labels


def main(args: argparse.Namespace) -> dict:
    """Writes the soup to --out and returns it."""
    with one_line_errors():
        if len(args.weights) < 2:
            raise UsageError(f"weights: {len(args.weights)} file given; a soup averages two or more")
        refuse_input_as_output("--out", args.out, args.weights)
        checkpoints = [load_checkpoint(path) for path in args.weights]
        check_ingredients(args.weights, checkpoints)
        soup = average([c["model"] for c in checkpoints])
        scores, labels = score(args.weights, checkpoints, soup, args)
    if note := fingerprint_note(args.weights, checkpoints, labels):
        print(note, file=sys.stderr)
    for name, (loss, nme) in zip([*map(str, args.weights), "soup"], scores):
        print(f"{name:<48} val_loss {loss:.5f}  val_nme {nme:.3f}%")
    best = min(nme for _, nme in scores[:-1])
    if scores[-1][1] > best:
        print(f"warning: the soup scores {scores[-1][1]:.3f}% against {best:.3f}% for the best ingredient: runs "
              f"that did not start from the same weights, or went far from them, do not average well",
              file=sys.stderr)
    config = checkpoints[0].get("config", {}) | {"soup": [str(p) for p in args.weights]}
    result = {"model": soup, "config": config, "val_loss": scores[-1][0], "val_nme": scores[-1][1],
              "labels_sha256": labels}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(result, out)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(parse_args())
