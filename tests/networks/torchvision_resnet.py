"""torchvision's resnet18 as a network of local learners, through pipeline.model.from_modules (docs/your-own-network.md's example)."""

import torchvision

import pipeline as lp


def build(ctx: lp.NetworkContext) -> lp.Network:
    return lp.from_modules(lambda: torchvision.models.resnet18(num_classes=ctx.num_classes),
                           starts=["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"])
