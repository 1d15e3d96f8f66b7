"""What tests share beyond fixtures: small models of every family, cached per session, and
random batches for them (imported as ``from helpers import ...``; conftest.py holds the
fixtures and the environment)."""
import warnings

import torch

import circuitlab

# name -> (load_model arguments, input size). Small inputs keep the suite fast on 2 cores.
FAMILY_MODELS = {
    "timm_resnet18": ("resnet18", {}, (3, 64, 64)),
    "timm_resnet50": ("resnet50", {}, (3, 64, 64)),
    "tv_resnet18": ("torchvision/resnet18", {}, (3, 64, 64)),
    "efficientnet_lite0": ("efficientnet_lite0", {}, (3, 224, 224)),
    "mobilenetv3": ("mobilenetv3_small_050", {}, (3, 64, 64)),
    "convnext": ("convnext_atto", {}, (3, 64, 64)),
    "tv_vgg11": ("torchvision/vgg11", {}, (3, 32, 32)),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 4}, (3, 32, 32)),
    "deit": ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2},
             (3, 32, 32)),
}

_cache: dict = {}


def get_model(key):
    if key not in _cache:
        name, kwargs, size = FAMILY_MODELS[key]
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {} if name in circuitlab.OFFLINE_MODELS else {"pretrained": False}
            hm = circuitlab.load_model(name, **extra, **kwargs,
                                       data_config={"input_size": size})
        _cache[key] = hm
    return _cache[key]


def batch_for(hm, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((b, *hm.input_size), generator=g)
