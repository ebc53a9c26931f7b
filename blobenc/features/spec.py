"""`FeatureSpec`: what a model trained on cached features needs to rebuild its inputs, written in the
cache's attributes and in every run's model.json (`features`), and compared in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from blobenc.errors import CacheError, ModelError


@dataclass(frozen=True)
class FeatureSpec:
    """The trunk (timm name and how it was made: pretrained, a weights file, or a random-init seed),
    the fingerprint of its weights, the preprocessing (timm's data config), the pooling of tokens,
    the number of prefix tokens (cls, registers), each cached layer's shape, the views per image and
    the stored dtype."""

    model: str
    trunk: dict
    weights_fingerprint: str
    preprocessing: dict
    pool: int | None
    num_prefix_tokens: int
    layer_shapes: dict[str, list[int]]
    views: int
    dtype: str

    @classmethod
    def from_dict(cls, d: dict, where: str = "model.json") -> FeatureSpec:
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ModelError(f"{where}: its feature spec has no {missing[0]!r}")
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: FeatureSpec, layers: Sequence[str]) -> list[str]:
        """What differs between two specs for a model reading `layers` ("key: ours vs theirs")."""
        out = []
        for key in ("weights_fingerprint", "pool", "preprocessing", "num_prefix_tokens"):
            if getattr(self, key) != getattr(other, key):
                out.append(f"{key} {getattr(self, key)!r} vs {getattr(other, key)!r}")
        for name in layers:
            have, want = self.layer_shapes.get(name), other.layer_shapes.get(name)
            if have is None or want is None:
                out.append(f"layer {name!r} {'missing' if have is None else list(have)} vs {want}")
            elif list(have) != list(want):
                out.append(f"layer {name} shape {list(have)} vs {list(want)}")
        return out

    def check_serves(self, model: FeatureSpec, layers: Sequence[str], where: str) -> None:
        """These features (a cache's, at `where`) are what a model trained on `model` reads from
        `layers`; else one CacheError naming what differs."""
        if self.weights_fingerprint != model.weights_fingerprint:
            raise CacheError(f"{where}: made with other trunk weights than the run was trained on")
        missing = [n for n in layers if n not in self.layer_shapes]
        if missing:
            raise CacheError(f"{where}: no layer {missing[0]!r}; the run needs {', '.join(layers)}")
        diff = self.differences(model, layers)
        if diff:
            raise CacheError(f"{where}: not the features the run was trained on: {'; '.join(diff)} (cache vs run)")

    def create_trunk(self, checked: bool = True):
        """The trunk these features came from, rebuilt (timm); with `checked`, its weights'
        fingerprint must be the spec's (the same pretrained tag or --weights file)."""
        from blobenc.features.trunk import TrunkSpec, create_trunk, weights_fingerprint

        trunk = create_trunk(TrunkSpec(**self.trunk))
        if checked and weights_fingerprint(trunk) != self.weights_fingerprint:
            raise ModelError(
                f"the rebuilt trunk {self.model} does not match the weights the features were made with "
                "(fingerprint differs): give the same --weights file, or the cache"
            )
        return trunk
