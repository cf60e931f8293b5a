"""How the head pose reads on labelled faces: the spread of yaw, pitch and roll from the predicted and from the true points, and the roll against the angle of the eye line."""
import numpy as np
from PIL import Image

from faces import Landmarker
from landmarks import LEFT_EYE_OUTER, NUM_LANDMARKS, RIGHT_EYE_OUTER, Face
from pose import head_pose

PERCENTILES = (5, 25, 50, 75, 95)


def eye_line_roll(points: np.ndarray) -> float:
    """Degrees the line through the outer eye corners leans, clockwise on screen (pose.head_pose's roll sign)."""
    (x0, y0), (x1, y1) = points[LEFT_EYE_OUTER], points[RIGHT_EYE_OUTER]
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)))


def spread(angles: np.ndarray) -> dict:
    return {f"p{q}": round(float(np.percentile(angles, q)), 1) for q in PERCENTILES}


def pose_test(landmarker: Landmarker, faces: list[Face]) -> dict:
    """Each face's points from its XML box, and the pose of those and of its true points."""
    if landmarker.markup.num_points != NUM_LANDMARKS:
        return {"faces": len(faces), "pose": None}
    predicted, true, eye = [], [], []
    for face in faces:
        with Image.open(face.image) as image:
            size = image.size
        [found] = landmarker(face.image, [face.box])
        predicted.append(found.pose)
        true.append(head_pose(face.points, *size))
        eye.append(eye_line_roll(found.points))
    predicted, true, eye = (np.array(a, np.float64) for a in (predicted, true, eye))
    off = np.abs((predicted[:, 2] - eye + 180) % 360 - 180)
    return {"faces": len(faces),
            "yaw_predicted": spread(predicted[:, 0]), "yaw_true_points": spread(true[:, 0]),
            "pitch_predicted": spread(predicted[:, 1]), "roll_predicted": spread(predicted[:, 2]),
            "yaw_beyond_30_pct": round(float(100 * np.mean(np.abs(predicted[:, 0]) > 30)), 1),
            "yaw_correlation_with_true_points": round(float(np.corrcoef(predicted[:, 0], true[:, 0])[0, 1]), 3),
            "yaw_median_abs_difference": round(float(np.median(np.abs(predicted[:, 0] - true[:, 0]))), 1),
            "roll_minus_eye_line_median_abs": round(float(np.median(off)), 2),
            "roll_within_5deg_of_eye_line_pct": round(float(100 * np.mean(off <= 5)), 1)}
