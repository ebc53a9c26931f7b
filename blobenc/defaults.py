"""Reference defaults (docs/model.md): importable without torch, so the CLI starts fast."""

DEFAULT_MODEL = "eva02_base_patch14_224.mim_in22k"
DEFAULT_LAYERS = ("blocks.[02468]", "blocks.10")
