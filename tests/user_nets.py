"""Networks of a user's own, for `import:user_nets:NAME` tasks in the tests (this folder is on sys.path)."""
import torch
from torch import nn


class GroupNormOverBranches(nn.Module):
    """Two branches concatenated and normalized together by a GroupNorm: a pruned channel changes
    the statistics of the kept channels in its group, so cutting it is not masking it."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        y = torch.relu(self.gn(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(torch.relu(self.d(torch.relu(self.c(y)))).mean((2, 3)))


def group_norm_over_branches(num_classes: int, in_channels: int = 3) -> nn.Module:
    return GroupNormOverBranches(num_classes, in_channels)


class GNBlock(nn.Module):
    def __init__(self, width: int, groups: int):
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width)
        self.conv2, self.gn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.GroupNorm(groups, width)

    def forward(self, x):
        return torch.relu(x + self.gn2(self.conv2(torch.relu(self.gn1(self.conv1(x))))))


class GNResNet(nn.Module):
    """A ResNet normalized by GroupNorm after every conv (4 groups): cutting a filter changes its
    group's statistics, so no cut is its masked self; `--approximate-cut` prunes it anyway."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, groups: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, width), nn.ReLU())
        self.blocks = nn.Sequential(GNBlock(width, groups), GNBlock(width, groups))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def gn_resnet(num_classes: int, in_channels: int = 3) -> nn.Module:
    return GNResNet(num_classes, in_channels)
