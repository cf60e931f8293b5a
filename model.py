"""The network alone: torchvision's ResNet18 with a 1-channel conv1 and a regression or PIPNet head, mapping (N, 1, S, S) crops to (N, 2K) normalised coordinates in eval mode. No project imports."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ResNet18 halves its input five times: below 32 px its last feature map is under a pixel. Above 1024 px
# a batch of crops no longer fits in memory, and the labels are not that precise anyway.
MIN_IMG_SIZE, MAX_IMG_SIZE = 32, 1024
HEADS = ("regression", "pip")
# What the pip head reads (docs/results.md, "Finer output"): layer4 at stride 32, as PIPNet at 256 px; layer4
# without its downsampling (stride 16, about 1.7 times the multiply-adds at 160 px); or layer4 upsampled
# onto a 1x1 projection of layer3 (stride 16 for a few percent more).
FEATURES = ("stride32", "stride16", "stride16-up")
# PIPNet's defaults (Jin et al. 2021): each landmark also predicts its 10 nearest neighbours in the mean shape.
PIP_NEIGHBOURS = 10
# The write-up's fc has 136 values: iBUG's 68 points (landmarks.NUM_LANDMARKS, which this file does not import).
WRITEUP_POINTS = 68


class PIPHead(nn.Module):
    """PIPNet's head on the backbone's features (stride 32 or 16): per landmark a score map, x/y offsets within the
    cell, and x/y offsets of its nearest neighbours from that cell.

    In training mode it returns the raw maps (training.pip_loss scores them); in eval mode it decodes them
    into (N, 2K) coordinates normalised to [-0.5, 0.5], each landmark averaged with what its neighbours'
    cells say of it, so the network keeps the contract of the regression head (and ONNX holds the decoding).
    """

    def __init__(self, in_channels: int, num_points: int, neighbours: int = PIP_NEIGHBOURS):
        super().__init__()
        # A markup of few points (dlib's 5) has fewer neighbours to ask.
        neighbours = min(neighbours, num_points - 1)
        self.num_points, self.neighbours = num_points, neighbours
        self.score = nn.Conv2d(in_channels, num_points, 1)
        self.offset = nn.Conv2d(in_channels, 2 * num_points, 1)
        self.neighbour_offset = nn.Conv2d(in_channels, 2 * num_points * neighbours, 1)
        # Filled by set_neighbours from the training faces' mean shape; saved with the weights.
        self.register_buffer("neighbour_index", torch.zeros(num_points, neighbours, dtype=torch.long))
        for conv in (self.score, self.offset, self.neighbour_offset):
            nn.init.normal_(conv.weight, std=0.001)
            nn.init.zeros_(conv.bias)

    def set_neighbours(self, mean_shape: torch.Tensor) -> None:
        """The nearest neighbours of each landmark in the mean shape (K, 2), itself excluded."""
        distance = torch.cdist(mean_shape.float(), mean_shape.float())
        distance.fill_diagonal_(math.inf)
        self.neighbour_index.copy_(distance.topk(self.neighbours, largest=False).indices)

    def maps(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, K, H, W), offsets (N, K, 2, H, W), neighbour offsets (N, K, M, 2, H, W)."""
        n, _, h, w = features.shape
        k, m = self.num_points, self.neighbours
        return (self.score(features), self.offset(features).view(n, k, 2, h, w),
                self.neighbour_offset(features).view(n, k, m, 2, h, w))

    def forward(self, features: torch.Tensor):
        scores, offsets, neighbour_offsets = self.maps(features)
        return (scores, offsets, neighbour_offsets) if self.training else self.decode(scores, offsets, neighbour_offsets)

    @staticmethod
    def read_cells(offsets: torch.Tensor, neighbour_offsets: torch.Tensor,
                   cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The offsets each landmark's map holds at its cell (`cells`: (N, K) flat indices): (N, K, 2) of its
        own and (N, K, M, 2) of its neighbours; what decoding reads and what the loss scores."""
        n, k, m = neighbour_offsets.shape[:3]
        own = offsets.flatten(3).gather(3, cells[:, :, None, None].expand(n, k, 2, 1)).squeeze(3)
        theirs = neighbour_offsets.flatten(4).gather(4, cells[:, :, None, None, None].expand(n, k, m, 2, 1))
        return own, theirs.squeeze(4)

    @staticmethod
    def point_scores(scores: torch.Tensor) -> torch.Tensor:
        """How sure the network is of each point, (N, K) in [0, 1]: the peak of its score map, which training
        pulls towards 1 at the point's cell and 0 elsewhere (training.pip_loss)."""
        return scores.flatten(2).amax(-1).clamp(0, 1)

    def decode(self, scores: torch.Tensor, offsets: torch.Tensor, neighbour_offsets: torch.Tensor) -> torch.Tensor:
        n, k, h, w = scores.shape
        m = self.neighbours
        best = scores.flatten(2).argmax(-1)                                   # (N, K): the winning cell
        cell = torch.stack([best % w, torch.div(best, w, rounding_mode="floor")], -1).to(offsets.dtype)
        own, theirs = self.read_cells(offsets, neighbour_offsets, best)
        own = (cell + own) / w                                                # (N, K, 2) in [0, 1]; crops are square
        theirs = (cell[:, :, None] + theirs) / w                              # (N, K, M, 2): landmark k's say on index[k]
        # Each landmark: the mean of its own estimate and of every estimate made of it from a neighbour's cell.
        spread = F.one_hot(self.neighbour_index.flatten(), k).to(own.dtype)   # (K*M, K)
        votes = torch.einsum("nsc,sk->nkc", theirs.reshape(n, k * m, 2), spread)
        merged = (own + votes) / (1 + spread.sum(0))[None, :, None]
        return (merged - 0.5).flatten(1)


def resnet_features(resnet: nn.Module) -> nn.Sequential:
    """torchvision ResNet's convolutional part, conv1 to layer4 (stride 32), without pooling or fc."""
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                         resnet.layer3, resnet.layer4)


def undownsampled(resnet: nn.Module) -> nn.Module:
    """The same ResNet with layer4 at layer3's stride (16): its first block's strides set to 1. Its weights
    are the same tensors, so a stride-32 state dict loads into it."""
    block = resnet.layer4[0]
    block.conv1.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    return resnet


class UpsampledFeatures(nn.Module):
    """Stride-16 features at little cost: layer4's (stride 32) upsampled twice and added to a 1x1 projection
    of layer3's, as a feature pyramid's top-down step."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.low = nn.Sequential(*resnet_features(resnet)[:-1])
        self.layer4 = resnet.layer4
        self.lateral = nn.Conv2d(resnet.layer3[-1].conv2.out_channels, resnet.fc.in_features, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fine = self.low(images)
        return self.lateral(fine) + F.interpolate(self.layer4(fine), size=fine.shape[-2:], mode="nearest")


class LandmarkNet(nn.Module):
    """ResNet18's convolutions (1-channel conv1) and a PIPNet head: the 'pip' head of build_model."""

    def __init__(self, backbone: nn.Module, num_points: int, features: str = "stride32"):
        super().__init__()
        if features == "stride16-up":
            self.backbone = UpsampledFeatures(backbone)
        else:
            self.backbone = resnet_features(undownsampled(backbone) if features == "stride16" else backbone)
        self.head = PIPHead(backbone.fc.in_features, num_points)

    def forward(self, images: torch.Tensor):
        return self.head(self.backbone(images))


def features_misfit(head: str, features: str) -> str | None:
    """Why `features` cannot feed `head`, or None where they fit: only the pip head reads finer features."""
    if features not in FEATURES:
        return f"{features!r} are not one of {FEATURES}"
    if features != "stride32" and head != "pip":
        return f"{features} feeds the pip head's score maps"
    return None


def build_model(head: str = "regression", num_points: int = WRITEUP_POINTS, imagenet: dict | None = None,
                features: str = "stride32") -> nn.Module:
    """ResNet18 with a 1-channel conv1 and, as in the write-up, a 2 x num_points-value fc (`regression`);
    or its convolutions with PIPNet's head (`pip`) on the `features` of FEATURES. Either maps (N, 1, S, S)
    crops to (N, 2K) coordinates in eval mode.

    `imagenet`: torchvision's ImageNet state dict (checkpoints.imagenet_weights) to start from, with conv1
    averaged over RGB.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
    problem = features_misfit(head, features)
    if problem:
        raise ValueError(f"features {problem}")
    # Imported here, not above: torchvision's own import brings torch._dynamo (about 2 s on 2 cores), and the
    # frozen network that predict.py loads back from network_cache needs neither it nor this function.
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    if imagenet is not None:
        model.load_state_dict(imagenet)
    rgb = model.conv1.weight.data
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if imagenet is not None:
        model.conv1.weight.data = rgb.mean(dim=1, keepdim=True)
    if head == "pip":
        return LandmarkNet(model, num_points, features)
    model.fc = nn.Linear(model.fc.in_features, 2 * num_points)
    return model
