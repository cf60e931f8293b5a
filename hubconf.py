"""torch.hub's entry: `torch.hub.load("<owner>/face-landmarks", "landmarker")` from GitHub, or `torch.hub.load(".", "landmarker", source="local")` from a clone."""
from faces import Landmarker

dependencies = ["torch", "torchvision", "numpy", "PIL", "cv2"]


def landmarker(**kwargs) -> Landmarker:
    """The released weights with OpenCV's YuNet in front: call it on a path, a PIL image or an H x W (x 3)
    uint8 array for a list of faces, each with .box, .points, .scores, .pose and .to_dict(). Takes faces.
    Landmarker's arguments: weights, device, detector ("yunet" or "hog"), any_roll, passes, eager, int8."""
    return Landmarker(**kwargs)
