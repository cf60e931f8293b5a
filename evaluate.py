"""The field's metrics on any dlib-layout XML: NME, failure rate and AUC by 300-W subset, CED curves, per-face CSV."""
import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import dlib_baseline
from dataset import (NUM_LANDMARKS, TEST_XML, TRAIN_XML, Face, FaceLandmarksDataset, Markup, label_problem, load_faces,
                     markup_for, nme, number_in, out_file, out_folder, trained_split)
from model import Network, inference_autocast, load_for_inference, pick_device
from transforms import CROP_MARGIN, Transforms, box_diagonal, face_matrix, mean_shape, points_to_target, unflip

THRESHOLDS = (8, 10)  # % of what normalises NME (iBUG: the outer-eye-corner distance)
MEAN_SHAPE, DLIB = "mean-shape", "dlib"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", nargs="+",
                   help="one or more weight files; several draw their curves on one plot "
                        "(default: runs/best.pt, or none when --baseline is given)")
    p.add_argument("--data-dir", default="data", help="folder holding the XML and images (default: data)")
    p.add_argument("--xml", help=f"labels file inside --data-dir (default: {TEST_XML}; with --split val, "
                                 f"the training XML of the weights)")
    p.add_argument("--split", choices=["all", "val"], default="all",
                   help="all faces of the XML, or only the validation split the weights were trained "
                        "with (default: all)")
    p.add_argument("--baseline", nargs="+", choices=[MEAN_SHAPE, DLIB], default=[],
                   help="also score the mean training shape placed in each box (the floor to beat) and/or "
                        "dlib's 68-point shape predictor on the same boxes (the peer to beat)")
    p.add_argument("--train-xml", default=TRAIN_XML,
                   help=f"XML inside --data-dir whose training split gives the mean shape (default: {TRAIN_XML})")
    p.add_argument("--flip-test", action="store_true", help="average with the prediction on the mirrored face")
    p.add_argument("--batch-size", type=number_in(int, 1), default=32, help="faces per batch (default: 32)")
    p.add_argument("--workers", type=number_in(int, 0), default=2, help="data-loading processes (default: 2)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: auto)")
    p.add_argument("--eager", action="store_true",
                   help="run the network as loaded, not traced and fused for the CPU (same points, slower)")
    p.add_argument("--out-dir", type=out_folder, default="eval",
                   help="folder for the CED plot and per-face CSVs (default: eval)")
    p.add_argument("--json", metavar="FILE", type=out_file, help="also write the table as JSON")
    p.add_argument("--skip-bad", action="store_true", help="skip bad faces instead of stopping")
    return p.parse_args(argv)


# ---------------------------------------------------------------- metrics

def failure_rate(errors: np.ndarray, threshold: float) -> float:
    """% of faces whose NME is above the threshold."""
    return float(100 * (np.asarray(errors) > threshold).mean())


def auc(errors: np.ndarray, threshold: float) -> float:
    """Area under the CED curve from 0 to the threshold, as % of the box: the integral of the fraction of
    faces with error <= e, which for each face is how far below the threshold its error lies."""
    return float(100 * np.clip(1 - np.asarray(errors) / threshold, 0, 1).mean())


def subset_of(face: Face, root: Path) -> str | None:
    """300-W's test subsets by path: Common is HELEN's and LFPW's test sets, Challenging is iBUG."""
    parts = face.image.relative_to(root).parts
    if parts[:2] in (("helen", "testset"), ("lfpw", "testset")):
        return "Common"
    if parts[0] == "ibug":
        return "Challenging"
    return None


def summarise(errors: np.ndarray, subsets: list[str | None], normalisation: str) -> dict[str, dict]:
    """The table: one row per subset that has faces, Full last; each row names what NME is normalised by."""
    table = {}
    for name in ("Common", "Challenging", "Full"):
        chosen = np.array([name == "Full" or s == name for s in subsets])
        if chosen.any():
            e = errors[chosen]
            table[name] = {"faces": int(chosen.sum()), "nme": float(e.mean()), "normalisation": normalisation,
                           **{f"fr{t}": failure_rate(e, t) for t in THRESHOLDS},
                           **{f"auc{t}": auc(e, t) for t in THRESHOLDS}}
    return table


def print_table(title: str, table: dict[str, dict]) -> None:
    print(f"\n{title}")
    print(f"{'subset':<12}{'faces':>7}{'NME %':>8}{'FR@8 %':>8}{'FR@10 %':>9}{'AUC@8':>8}{'AUC@10':>8}")
    for name, row in table.items():
        print(f"{name:<12}{row['faces']:>7}{row['nme']:>8.2f}{row['fr8']:>8.2f}{row['fr10']:>9.2f}"
              f"{row['auc8']:>8.2f}{row['auc10']:>8.2f}")


# ---------------------------------------------------------------- predictions

@torch.no_grad()
def predict_targets(model: Network, loader: DataLoader, device: torch.device, markup: Markup,
                    flip_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true targets (N, K, 2) in crop coordinates; NME there equals NME in the image, since
    the crop is a similarity transform."""
    from tqdm import tqdm
    preds, truths = [], []
    for images, targets in tqdm(loader, desc="evaluating", unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        with inference_autocast(device):
            pred = model(images).float()
            if flip_test:
                pred = (pred + unflip(model(images.flip(-1)).float(), markup.flip)) / 2
        preds.append(pred.cpu().numpy())
        truths.append(targets.numpy())
    k = markup.num_points
    return np.concatenate(preds).reshape(-1, k, 2), np.concatenate(truths).reshape(-1, k, 2)


def scorable(faces: list[Face], xml: Path, markup: Markup) -> list[Face]:
    """The faces whose labels can be scored; each one left out is named, so no average becomes inf or NaN."""
    kept = []
    for face in faces:
        problem = label_problem(face, markup)
        if problem:
            print(f"{problem}; left out of the averages", file=sys.stderr)
        else:
            kept.append(face)
    if not kept:
        raise SystemExit(f"{xml}: no face has labels that can be scored")
    return kept


def select_faces(args: argparse.Namespace, config: dict) -> tuple[list[Face], Path, Markup]:
    """The faces to score: the whole XML, or the validation split recorded in the weights (loaded as
    training loaded them, so that the split is the same); and their markup, the weights' (the XML must
    have its point count), or without weights the one its point count implies."""
    fixed = Markup.from_config(config) if config else None
    markup = (lambda k: fixed) if fixed else markup_for
    if args.split == "val":
        xml = Path(args.data_dir) / (args.xml or config.get("xml", TRAIN_XML))
        faces = load_faces(xml, args.skip_bad or config.get("skip_bad", False), markup=markup)
        _, val_idx = trained_split(len(faces), config)
        return [faces[i] for i in val_idx], xml, fixed or markup_for(len(faces[0].points))
    xml = Path(args.data_dir) / (args.xml or TEST_XML)
    faces = load_faces(xml, args.skip_bad, keep_degenerate=True, markup=markup)
    fixed = fixed or markup_for(len(faces[0].points))
    return scorable(faces, xml, fixed), xml, fixed


def score(pred: np.ndarray, truths: np.ndarray, faces: list[Face], markup: Markup) -> np.ndarray:
    """Per-face NME of targets in crop coordinates (where the box diagonal is box_diagonal's)."""
    return nme(pred, truths, markup, [box_diagonal(f.box) for f in faces])


def write_faces_csv(path: Path, faces: list[Face], errors: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "left", "top", "width", "height", "nme"])
        for face, error in zip(faces, errors):
            writer.writerow([str(face.image), *(f"{v:g}" for v in face.box), f"{error:.4f}"])


def plot_ced(curves: dict[str, np.ndarray], path: Path, limit: float = 10.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, errors in curves.items():
        x = np.sort(errors)
        ax.step(np.r_[0, x], np.r_[0, np.arange(1, len(x) + 1) / len(x)], where="post",
                label=f"{name} (NME {errors.mean():.2f}%)")
    ax.set(xlim=(0, limit), ylim=(0, 1), xlabel="NME (%)", ylabel="fraction of faces",
           title="cumulative error distribution")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_name(weights: str) -> str:
    path = Path(weights)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def refuse_dlib_for_other_markup(args: argparse.Namespace, xml: Path, markup: Markup) -> None:
    """Checked before any scoring, so that a refused baseline costs no work."""
    if DLIB in args.baseline and markup.num_points != NUM_LANDMARKS:
        raise SystemExit(f"--baseline dlib: dlib's model puts iBUG's 68 points; {xml} has {markup.num_points}")


def main(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, curves, faces, config = {}, {}, None, {}

    def record(name: str, title: str, errors: np.ndarray, root: Path) -> None:
        curves[name] = errors
        results[name] = summarise(errors, [subset_of(f, root) for f in faces], markup.normalisation)
        write_faces_csv(out / f"{name.replace('/', '_').replace(' +', '_')}_faces.csv", faces, errors)
        print_table(f"{title}; NME over the {markup.normalisation}", results[name])

    predictor = dlib_baseline.load_predictor() if DLIB in args.baseline else None  # missing: say so first
    for weights in args.weights or ([] if args.baseline else ["runs/best.pt"]):
        model, config = load_for_inference(weights, device, args.eager)
        faces, xml, markup = select_faces(args, config)
        refuse_dlib_for_other_markup(args, xml, markup)
        if args.flip_test and markup.flip is None:
            raise SystemExit(f"--flip-test: {weights} was trained on {markup.num_points} points without "
                             f"--flip-pairs, so which point mirrors which is unknown")
        data = FaceLandmarksDataset(faces, Transforms(config.get("img_size", 224), train=False))
        loader = DataLoader(data, args.batch_size, num_workers=args.workers)
        pred, truths = predict_targets(model, loader, device, markup, args.flip_test)
        record(run_name(weights) + (" +flip" if args.flip_test else ""),
               f"{weights}{' with flip test' if args.flip_test else ''} on {xml}", score(pred, truths, faces, markup),
               xml.parent)
    if args.baseline and faces is None:
        faces, xml, markup = select_faces(args, config)
        refuse_dlib_for_other_markup(args, xml, markup)
    if MEAN_SHAPE in args.baseline:
        train_xml = Path(args.data_dir) / args.train_xml
        # Loaded as training loaded it (the weights' markup), so that the split is the same.
        train_faces = load_faces(train_xml, args.skip_bad or config.get("skip_bad", False), markup=lambda k: markup)
        train_idx, _ = trained_split(len(train_faces), config)
        shape = mean_shape([train_faces[i] for i in train_idx])
        truths = np.stack([points_to_target(f.points, face_matrix(f.box, 1, CROP_MARGIN), 1) for f in faces])
        record(MEAN_SHAPE, f"mean training shape of {train_xml} placed in each box",
               score(np.broadcast_to(shape, truths.shape), truths, faces, markup), xml.parent)
    if DLIB in args.baseline:
        pred = dlib_baseline.predict_faces(predictor, faces)
        record(DLIB, f"dlib's 68-point shape predictor ({dlib_baseline.MODEL_FILE}) on the same boxes of {xml}",
               nme(pred, np.stack([f.points for f in faces]), markup), xml.parent)
    plot_ced(curves, out / "ced.png")
    print(f"\nwrote {out / 'ced.png'} and per-face CSVs in {out}/")
    if args.json:
        table = next(iter(results.values())) if len(results) == 1 else results
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table, indent=2))
    return results


if __name__ == "__main__":
    main(parse_args())
