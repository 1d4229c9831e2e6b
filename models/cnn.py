"""Convolutional classifiers: LeNet-5 and a CIFAR ResNet-20."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5 (LeCun 1998, ReLU + max-pool) on 28×28 inputs: 61,706 parameters for 1 channel."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    """3×3 conv-BN-ReLU, 3×3 conv-BN, identity skip; option-A shortcut (stride-2 subsample and
    zero-padded channels, no parameters) when the shape changes. Written the torchvision way
    (`nn.ReLU(inplace=True)`, `out += identity`): the in-place idioms salcompile must handle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x
        if self.stride != 1 or self.pad:
            skip = F.pad(x[:, :, ::self.stride, ::self.stride],
                         (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        out += skip
        return self.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, §4.2): a 3×3 stem, 3 stages × 3 basic blocks of 16/32/64
    channels (stride 2 entering stages 2 and 3), global average pool, linear head; Kaiming init.
    269,722 parameters for 3 input channels and 10 classes."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, widths=(16, 32, 64),
                 blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return self.fc(x.mean((2, 3)))
