"""Per-family knowledge: classifier, pooled features and default taps for every family."""
import pytest

from helpers import get_model

EXPECTED = {
    "timm_resnet18": ("resnet", "fc", ("act1", "layer1", "layer2", "layer3", "layer4")),
    "timm_resnet50": ("resnet", "fc", ("act1", "layer1", "layer2", "layer3", "layer4")),
    "tv_resnet18": ("resnet", "fc", ("relu", "layer1", "layer2", "layer3", "layer4")),
    "efficientnet_lite0": ("efficientnet", "classifier",
                           ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6")),
    "mobilenetv3": ("mobilenet", "classifier",
                    ("bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5")),
    "convnext": ("convnext", "head.fc", ("stages.0", "stages.1", "stages.2", "stages.3")),
    "tv_vgg11": ("vgg", "classifier.6",
                 ("features.2", "features.5", "features.10", "features.15", "features.20")),
    "vit": ("vit", "head", ("blocks.0", "blocks.2", "blocks.3")),
    "deit": ("vit", "head", ("blocks.0", "blocks.1")),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_family_knowledge(key):
    hm = get_model(key)
    family, classifier, taps = EXPECTED[key]
    assert hm.family.name == family
    assert hm.classifier == classifier
    assert hm.taps == taps
    pooled = hm.point("hook_pooled")
    head = hm.model.get_submodule(classifier)
    assert pooled.shape == (1, head.in_features)
    assert hm.point("hook_logits").shape == (1, head.out_features)
    assert bool(hm.family.blocks) == (family != "vgg"), "VGG alone has no blocks"
    assert all(hm.point(b).kind == "block" for b in hm.family.blocks)
    assert all(not b.startswith(o + ".") for b in hm.family.blocks for o in hm.family.blocks)


def test_vit_taps_follow_the_paper_for_twelve_blocks():
    from circuitlab.families import FAMILIES
    vit = next(f for f in FAMILIES if f.transformer)
    rule = vit.tap_rules[0]
    assert rule(None, [], [f"blocks.{i}" for i in range(12)]) == ["blocks.3", "blocks.7",
                                                                  "blocks.11"]


def test_families_are_recognised_from_the_declared_table():
    from circuitlab.families import FAMILIES, GENERIC, family_of
    for spec in FAMILIES:
        for fragment in spec.fragments:
            model = type(f"My{fragment.title()}Net", (), {})()
            assert family_of(model) in FAMILIES[:FAMILIES.index(spec) + 1]
    assert family_of(object()) is GENERIC and not GENERIC.transformer


def test_generic_module_gets_classifier_and_resolution_taps():
    import torch
    from torch import nn

    from circuitlab import load_model

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
            self.c2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.out = nn.Linear(16, 7)

        def forward(self, x):
            return self.out(self.pool(self.c2(self.c1(x))).flatten(1))
    hm = load_model(Tiny(), data_config={"input_size": (3, 16, 16)})
    assert hm.family.name == "generic" and hm.classifier == "out"
    assert hm.taps == ("c1", "c2")  # the 1x1 pooled output is not a map
    assert hm.labels is None and hm.label(3) == "class 3"
    assert hm(torch.randn(2, 3, 16, 16)).shape == (2, 7)
