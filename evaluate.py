"""The field's metrics on any dlib-layout XML: NME, failure rate and AUC by 300-W subset, CED curves, per-face CSV."""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import dlib_baseline
from checkpoints import NetworkConfig
from dataset import FaceLandmarksDataset, split_faces, trained_split
from detection_eval import by_image, error_spread, fit_yunet_box, score_found, source_errors
from detectors import DETECTORS, any_roll_problem
from faces import Landmarker, LandmarkerOptions
from errors import DataError, UsageError
from files import save_figure, write_atomic
from flags import WORKERS_MAX, number_in, one_line_errors, out_file, out_folder
from labels import TEST_XML, TRAIN_XML, label_problem, load_faces
from landmarks import NUM_LANDMARKS, Face, Markup, markup_for, nme, region_errors, regions_of
from runtime import Network, inference_autocast, pick_device
from pose_eval import pose_test
from score_eval import OCCLUDERS, score_test
from transforms import CROP_MARGIN, Transforms, box_diagonal, face_matrix, mean_shape, points_to_target, unflip

THRESHOLDS = (8, 10)  # % of what normalises NME (iBUG: the outer-eye-corner distance)
MEAN_SHAPE, DLIB = "mean-shape", "dlib"
# The folders of dlib's 300-W download that its subsets start from.
SUBSET_ROOTS = ("helen", "lfpw", "ibug", "afw")


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
    p.add_argument("--workers", type=number_in(int, 0, WORKERS_MAX), default=2,
                   help="data-loading processes (default: 2)")
    LandmarkerOptions.add_network_flags(p)
    p.add_argument("--out-dir", type=out_folder, default="eval",
                   help="folder for the CED plot and per-face CSVs (default: eval)")
    p.add_argument("--json", metavar="FILE", type=out_file, help="also write the table as JSON")
    p.add_argument("--skip-bad", action="store_true", help="skip bad faces instead of stopping")
    p.add_argument("--detector", choices=DETECTORS,
                   help="also let this detector find the faces in the photos, and report the share it missed and "
                        "the NME on those it found (a user's end-to-end accuracy)")
    p.add_argument("--any-roll", action="store_true", help="with --detector yunet: look at four quarter turns")
    p.add_argument("--turn", nargs="+", type=number_in(float, -360, 360), default=[0.0], metavar="DEG",
                   help="with --detector: turn each photo by these degrees (clockwise) first (default: 0)")
    p.add_argument("--passes", type=number_in(int, 1, 4),
                   help="more than 1 looks again at each face, levelled by the last look's points: also scores the "
                        "XML's boxes that way (through the Landmarker, as predict.py --box), and --detector's faces "
                        "(default: as predict.py's for --detector; one look on the XML's boxes)")
    p.add_argument("--score-test", action="store_true",
                   help="also measure the point scores: covered against visible points (AUROC), and against "
                        "each point's error (rank correlation)")
    p.add_argument("--pose-test", action="store_true",
                   help="also measure the head pose on the XML's boxes: the spread of yaw, pitch and roll, yaw "
                        "against the true points' yaw, and roll against the eye line's angle")
    p.add_argument("--source-errors", action="store_true",
                   help="how far each source of a crop (the XML's box, --detector (yunet unless given) on the "
                        "photos turned by each --turn, the first look's points) frames each face off the level "
                        "frame of its true points: the figures --align training's jitter is set from")
    p.add_argument("--fit-box", action="store_true",
                   help="only fit YuNet's box to dlib's on the training split of --xml, and print it")
    args = p.parse_args(argv)
    if (args.any_roll or args.turn != [0.0]) and not (args.detector or args.source_errors):
        p.error("--any-roll and --turn go with --detector or --source-errors, which turn the photos")
    if problem := any_roll_problem(args.detector, args.any_roll, flags=True):
        p.error(problem)
    return args


# ---------------------------------------------------------------- metrics

def failure_rate(errors: np.ndarray, threshold: float) -> float:
    """% of faces whose NME is above the threshold."""
    return float(100 * (np.asarray(errors) > threshold).mean())


def auc(errors: np.ndarray, threshold: float) -> float:
    """Area under the CED curve from 0 to the threshold, as % of the box: the integral of the fraction of
    faces with error <= e, which for each face is how far below the threshold its error lies."""
    return float(100 * np.clip(1 - np.asarray(errors) / threshold, 0, 1).mean())


def subset_of(face: Face, root: Path) -> str | None:
    """300-W's test subsets by path: Common is HELEN's and LFPW's test sets, Challenging is iBUG. A face
    outside the data folder (an XML of absolute paths, as dlib's imglab writes) is judged by its own folders."""
    try:
        folders = face.image.relative_to(root).parts[:-1]
    except ValueError:
        folders = face.image.parts[:-1]
        folders = folders[max((i for i, f in enumerate(folders) if f in SUBSET_ROOTS), default=0):]
    if folders[:2] in (("helen", "testset"), ("lfpw", "testset")):
        return "Common"
    if folders[:1] == ("ibug",):
        return "Challenging"
    return None


def summarise(errors: np.ndarray, subsets: list[str | None], normalisation: str,
              regions: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """The table: one row per subset that has faces, Full last; each row names what NME is normalised by,
    and holds the NME of each region under "regions" where the markup names regions (landmarks.region_errors)."""
    table = {}
    for name in ("Common", "Challenging", "Full"):
        chosen = np.array([name == "Full" or s == name for s in subsets])
        if chosen.any():
            e = errors[chosen]
            table[name] = {"faces": int(chosen.sum()), "nme": float(e.mean()), "normalisation": normalisation,
                           **{f"fr{t}": failure_rate(e, t) for t in THRESHOLDS},
                           **{f"auc{t}": auc(e, t) for t in THRESHOLDS}}
            if regions is not None:
                table[name]["regions"] = {k: float(v[chosen].mean()) for k, v in regions.items()}
    return table


def print_table(title: str, table: dict[str, dict], markup: Markup) -> None:
    print(f"\n{title}")
    print(f"{'subset':<12}{'faces':>7}{'NME %':>8}{'FR@8 %':>8}{'FR@10 %':>9}{'AUC@8':>8}{'AUC@10':>8}")
    for name, row in table.items():
        print(f"{name:<12}{row['faces']:>7}{row['nme']:>8.2f}{row['fr8']:>8.2f}{row['fr10']:>9.2f}"
              f"{row['auc8']:>8.2f}{row['auc10']:>8.2f}")
    if regions_of(markup) is None:
        print(f"by region: none, {markup.num_points} points name no regions (iBUG's 68 and WFLW's 98 do)")
        return
    names = [k for k in next(iter(table.values()))["regions"] if "_" not in k]
    print(f"{'by region':<12}" + "".join(f"{n:>8}" for n in names) + "   outline: across / along")
    for name, row in table.items():
        r = row["regions"]
        outlines = "  ".join(f"{n} {r[n + '_across']:.2f} / {r[n + '_along']:.2f}" for n in names if n + "_along" in r)
        print(f"{name:<12}" + "".join(f"{r[n]:>8.2f}" for n in names) + f"   {outlines}")


# ---------------------------------------------------------------- predictions

@torch.no_grad()
def predict_targets(model: Network, loader: DataLoader, device: torch.device, markup: Markup,
                    flip_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true targets (N, K, 2) in crop coordinates; NME there equals NME in the image, since
    the crop is a similarity transform."""
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
        raise DataError(f"{xml}: no face has labels that can be scored")
    return kept


def select_faces(args: argparse.Namespace, config: NetworkConfig | None) -> tuple[list[Face], Path, Markup]:
    """The faces to score: the whole XML, or the validation split recorded in the weights (loaded as
    training loaded them, so that the split is the same); and their markup, the weights' (the XML must
    have its point count), or without weights the one its point count implies."""
    fixed = config.markup if config is not None else None
    markup_of = (lambda k: fixed) if fixed else markup_for
    if args.split == "val":
        config = config or NetworkConfig()
        xml = Path(args.data_dir) / (args.xml or config.xml)
        faces = load_faces(xml, args.skip_bad or config.skip_bad, markup_of=markup_of)
        _, val_idx = trained_split(len(faces), config)
        return [faces[i] for i in val_idx], xml, fixed or markup_for(len(faces[0].points))
    xml = Path(args.data_dir) / (args.xml or TEST_XML)
    faces = load_faces(xml, args.skip_bad, keep_degenerate=True, markup_of=markup_of)
    fixed = fixed or markup_for(len(faces[0].points))
    return scorable(faces, xml, fixed), xml, fixed


def crop_diagonals(faces: list[Face]) -> list[float]:
    """Each face's box diagonal in crop coordinates, where NME of targets is measured (box_diagonal's)."""
    return [box_diagonal(f.box) for f in faces]


def looks_in_boxes(landmarker: Landmarker, faces: list[Face]) -> np.ndarray:
    """(N, K, 2): each face's points from its XML box, through the Landmarker as predict.py --box runs it (its
    passes included), in the order of `faces`."""
    points = {}
    for image, labelled in tqdm(by_image(faces).items(), desc="looking", unit="image", leave=False):
        for face, look in zip(labelled, landmarker(image, boxes=[f.box for f in labelled])):
            points[id(face)] = look.points
    return np.stack([points[id(f)] for f in faces])


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
    save_figure(fig, path)
    plt.close(fig)


def run_name(weights: str) -> str:
    path = Path(weights)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def refuse_dlib_for_other_markup(args: argparse.Namespace, xml: Path, markup: Markup) -> None:
    """Checked before any scoring, so that a refused baseline costs no work."""
    if DLIB in args.baseline and markup.num_points != NUM_LANDMARKS:
        raise UsageError(f"--baseline dlib: dlib's model puts iBUG's 68 points; {xml} has {markup.num_points}")


def main(args: argparse.Namespace) -> dict:
    with one_line_errors():
        return fit_box(args) if args.fit_box else evaluate(args)


class Report:
    """The tables, curves and per-face CSVs of one evaluate.py run, filled as each model is scored."""

    def __init__(self, out: Path):
        self.out, self.results, self.curves = out, {}, {}

    def record(self, name: str, title: str, pred: np.ndarray, truths: np.ndarray, faces: list[Face], root: Path,
               markup: Markup, diagonals: list[float] | None = None) -> None:
        """One model's points (N, K, 2) against the truths in the same coordinates, whose box diagonals are
        `diagonals` (for a markup that normalises NME by them)."""
        errors = nme(pred, truths, markup, diagonals)
        self.curves[name] = errors
        self.results[name] = summarise(errors, [subset_of(f, root) for f in faces], markup.normalisation,
                                       region_errors(pred, truths, markup, diagonals))
        write_faces_csv(self.out / f"{name.replace('/', '_').replace(' +', '_')}_faces.csv", faces, errors)
        print_table(f"{title}; NME over the {markup.normalisation}", self.results[name], markup)


def evaluate(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    report = Report(Path(args.out_dir))
    report.out.mkdir(parents=True, exist_ok=True)
    faces, config, xml, markup = None, None, None, None
    predictor = dlib_baseline.load_predictor() if DLIB in args.baseline else None  # missing: say so first
    for weights in args.weights or ([] if args.baseline else ["runs/best.pt"]):
        faces, config, xml, markup = score_weights(args, weights, device, report)
    if args.baseline and faces is None:
        faces, xml, markup = select_faces(args, config)
        refuse_dlib_for_other_markup(args, xml, markup)
    if MEAN_SHAPE in args.baseline:
        score_mean_shape(args, config, faces, xml, markup, report)
    if DLIB in args.baseline:
        pred = dlib_baseline.predict_faces(predictor, faces)
        report.record(DLIB, f"dlib's 68-point shape predictor ({dlib_baseline.MODEL_FILE}) on the same boxes of "
                            f"{xml}", pred, np.stack([f.points for f in faces]), faces, xml.parent, markup)
    plot_ced(report.curves, report.out / "ced.png")
    print(f"\nwrote {report.out / 'ced.png'} and per-face CSVs in {report.out}/")
    if args.json:
        results = report.results
        write_atomic(Path(args.json), json.dumps(next(iter(results.values())) if len(results) == 1 else results,
                                                 indent=2))
    return report.results


def score_weights(args: argparse.Namespace, weights: str, device: torch.device,
                  report: Report) -> tuple[list[Face], NetworkConfig, Path, Markup]:
    """One weights file on the XML's boxes (the 300-W protocol) and, with --detector, on the faces it finds."""
    landmarker = Landmarker(LandmarkerOptions.from_flags(args, weights=weights))
    model, config = landmarker.model, landmarker.config
    faces, xml, markup = select_faces(args, config)
    refuse_dlib_for_other_markup(args, xml, markup)
    if args.flip_test and markup.flip is None:
        raise UsageError(f"--flip-test: {weights} was trained on {markup.num_points} points without "
                         f"--flip-pairs, so which point mirrors which is unknown")
    data = FaceLandmarksDataset(faces, Transforms(config.img_size, train=False))
    loader = DataLoader(data, args.batch_size, num_workers=args.workers)
    pred, truths = predict_targets(model, loader, device, markup, args.flip_test)
    report.record(run_name(weights) + (" +flip" if args.flip_test else ""),
                  f"{weights}{' with flip test' if args.flip_test else ''} on {xml}",
                  pred, truths, faces, xml.parent, markup, crop_diagonals(faces))
    if (args.passes or 1) > 1:
        report.record(f"{run_name(weights)} +{args.passes}passes", f"{weights} on {xml}, {args.passes} looks per box",
                      looks_in_boxes(landmarker, faces), np.stack([f.points for f in faces]), faces, xml.parent,
                      markup, [math.hypot(f.box.width, f.box.height) for f in faces])
    for occluder in OCCLUDERS if args.score_test else ():
        row = score_test(model, faces, config.img_size, markup, occluder=occluder)
        report.results[f"{run_name(weights)} point scores, {occluder}"] = row
        print(f"point scores of {weights}, covered by {occluder}: AUROC {row['auroc_visible_vs_covered']:.3f} for "
              f"visible against covered points ({row['visible_points']} and {row['covered_points']}; mean "
              f"{row['mean_score_visible']:.3f} against {row['mean_score_covered']:.3f}); rank correlation with the "
              f"point's error {row['spearman_score_vs_error']:+.3f} (Pearson {row['pearson_score_vs_error']:+.3f})")
    if args.pose_test:
        row = pose_test(landmarker.with_options(passes=None), faces)
        report.results[f"{run_name(weights)} head pose"] = row
        print(f"head pose of {weights}: {json.dumps(row)}")
    if args.source_errors:
        report_source_errors(args, landmarker.with_options(passes=None), faces, markup, report)
    if args.detector:
        passes = landmarker.passes_for(boxes_given=False)
        for degrees in args.turn:
            name = (f"{run_name(weights)} {args.detector}{' any-roll' if args.any_roll else ''} {passes} "
                    f"pass{'es' * (passes > 1)} {degrees:g}deg")
            report.results[name] = found_row(score_found(landmarker, faces, markup, degrees), degrees)
            print_found(name, report.results[name])
    return faces, config, xml, markup


def report_source_errors(args: argparse.Namespace, landmarker: Landmarker, faces: list[Face], markup: Markup,
                         report: Report) -> None:
    for degrees in args.turn:
        for source, errors in source_errors(landmarker, faces, markup, degrees).items():
            name = f"{source} framing, photos turned {degrees:g}deg"
            report.results[name] = error_spread(errors)
            print(f"{name}: {json.dumps(report.results[name])}")


def found_row(errors: np.ndarray, degrees: float) -> dict:
    """What a user gets from detection: the share of faces found, and the NME of those found."""
    found = errors[~np.isnan(errors)]
    return {"turn_degrees": degrees, "faces": len(errors), "found_pct": float(100 * len(found) / len(errors)),
            "nme": float(found.mean()) if len(found) else math.nan,
            "median": float(np.median(found)) if len(found) else math.nan,
            **{f"fr{t}": failure_rate(found, t) for t in THRESHOLDS}}


def print_found(name: str, row: dict) -> None:
    print(f"{name}: found {row['found_pct']:.1f}% of {row['faces']} faces; their NME {row['nme']:.2f}% "
          f"(median {row['median']:.2f}%, FR@10 {row['fr10']:.2f}%)")


def score_mean_shape(args: argparse.Namespace, config: NetworkConfig | None, faces: list[Face], xml: Path, markup: Markup,
                     report: Report) -> None:
    train_xml = Path(args.data_dir) / args.train_xml
    # Loaded as training loaded it (the weights' markup), so that the split is the same.
    config = config or NetworkConfig()
    train_faces = load_faces(train_xml, args.skip_bad or config.skip_bad, markup_of=lambda k: markup)
    train_idx, _ = trained_split(len(train_faces), config)
    shape = mean_shape([train_faces[i] for i in train_idx])
    truths = np.stack([points_to_target(f.points, face_matrix(f.box, 1, CROP_MARGIN), 1) for f in faces])
    report.record(MEAN_SHAPE, f"mean training shape of {train_xml} placed in each box",
                  np.broadcast_to(shape, truths.shape), truths, faces, xml.parent, markup, crop_diagonals(faces))


def fit_box(args: argparse.Namespace) -> dict:
    """--fit-box: YuNet's box relation fitted on the training split, printed for detectors.YUNET_RELATION."""
    xml = Path(args.data_dir) / (args.xml or TRAIN_XML)
    faces = load_faces(xml, args.skip_bad)
    train_idx, _ = split_faces(len(faces))
    relation, misfit, n = fit_yunet_box([faces[i] for i in train_idx])
    print(f"YUNET_RELATION = BoxRelation(side={relation.side:.4f}, dx={relation.dx:.4f}, dy={relation.dy:.4f}) "
          f"from {n} of the {len(train_idx)} training faces of {xml} (YuNet found and matched); RMS misfit "
          f"side {misfit['side']:.1%}, centre ({misfit['dx']:.1%}, {misfit['dy']:.1%}) of dlib's box side")
    return {"relation": relation._asdict(), "misfit": misfit, "faces": n}


if __name__ == "__main__":
    main(parse_args())
