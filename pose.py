"""Head pose from iBUG's 68 points: OpenCV's solvePnP against a generic 3-D face, as yaw, pitch and roll in degrees."""
import math

import numpy as np

from detectors import cv2
from landmarks import LEFT_EYE_OUTER, NUM_LANDMARKS, RIGHT_EYE_OUTER

# The points the 3-D face gives: chin, brow ends, nose bridge, tip and base, eye corners, mouth corners.
POSE_POINTS = (8, 17, 26, 27, 30, 33, 36, 39, 42, 45, 48, 54)
# x right and y down in units of the outer-eye-corner distance, from the eye corners' midpoint: the mean
# shape of the 1,811 training faces of ../shared/data/300w_subset (transforms.mean_shape), made symmetric.
# z (away from the camera) set by hand from average adult proportions (Farkas' anthropometry, rounded):
# the nose tip about 38 mm ahead of the outer eye corners, which lie about 90 mm apart. Only roughly
# right is needed: the pose is a direction, and the checks in test_all.py are its signs and sizes.
FACE_3D = np.array([
    [0.0, 1.321, -0.11],                     # 8 chin
    [-0.664, -0.154, -0.02], [0.664, -0.154, -0.02],  # 17, 26 outer brow ends
    [0.0, -0.02, -0.17],                     # 27 nose bridge
    [0.0, 0.407, -0.42],                     # 30 nose tip
    [0.0, 0.557, -0.24],                     # 33 nose base
    [-0.5, 0.0, 0.0], [-0.215, 0.019, -0.11],   # 36, 39 right eye (on the image's left): outer, inner corner
    [0.215, 0.019, -0.11], [0.5, 0.0, 0.0],     # 42, 45 left eye: inner, outer corner
    [-0.317, 0.768, -0.15], [0.317, 0.768, -0.15],  # 48, 54 mouth corners
])


def head_pose(points: np.ndarray, width: int, height: int) -> tuple[float, float, float] | None:
    """(yaw, pitch, roll) in degrees of the face whose 68 iBUG points these are, in a picture width x height
    taken by a camera of focal length `width` pixels looking at its centre; None for another markup.

    yaw > 0: the face turns towards the picture's right (the person's own left); pitch > 0: the chin
    comes up; roll > 0: the face leans clockwise on screen. A frontal, level face is (0, 0, 0).
    """
    if len(points) != NUM_LANDMARKS:
        return None
    camera = np.array([[width, 0, width / 2], [0, width, height / 2], [0, 0, 1]], np.float64)
    image_points = np.ascontiguousarray(points[list(POSE_POINTS)], np.float64)
    # Started from a frontal face in front of the camera, at the distance its eye corners' spacing gives:
    # left to find its own start, solvePnP put 4 faces in 10 of the 300-W subset behind the camera,
    # mirrored, with a roll near 180 degrees.
    eyes = points[[LEFT_EYE_OUTER, RIGHT_EYE_OUTER]].astype(np.float64)
    distance = width / max(float(np.linalg.norm(eyes[1] - eyes[0])), 1e-6)  # the model's eyes are 1 apart
    centre = (eyes.mean(0) - [width / 2, height / 2]) * distance / width
    start = np.array([[centre[0]], [centre[1]], [distance]])
    ok, rotation, position = cv2.solvePnP(FACE_3D, image_points, camera, None, np.zeros((3, 1)), start,
                                          useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or position[2, 0] <= 0:
        return None
    return euler(cv2.Rodrigues(rotation)[0])


def euler(r: np.ndarray) -> tuple[float, float, float]:
    """R = Rz(roll) Ry(b) Rx(a) in the camera's axes (x right, y down, z ahead): yaw = -b and pitch = -a, so
    that a nose turned right or up counts positive."""
    b = math.asin(max(-1.0, min(1.0, -r[2, 0])))
    a = math.atan2(r[2, 1], r[2, 2])
    roll = math.atan2(r[1, 0], r[0, 0])
    return -math.degrees(b), -math.degrees(a), math.degrees(roll)
