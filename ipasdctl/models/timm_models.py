"""`--arch timm:<name>`: any model timm builds, wrapped to the contract of models/base.py through timm's own API.

timm is an optional extra (`pip install 'ipasdctl[timm]'`); it is imported when such a model is built.
- The body is `timm.create_model(name, num_classes=0)`: timm's network without its classifier, whose forward is
  `forward_features` then `forward_head(pre_logits=True)`: the embedding (pooled, and for models with a head
  convolution, as MobileNetV3, after it). `classifier` is a new nn.Linear(embedding -> K) on it.
- Stages: `forward_intermediates` (the last MAX_STAGES feature maps timm reports in `feature_info`, NCHW). When the
  last one is not the map the embedding is pooled from (a head convolution, a ViT's class token, a norm after
  pooling), the embedding itself is appended as a 1x1 stage, so `stages[-1]` pooled is exactly the embedding
  (as for torchvision's MobileNetV3). A model without `forward_intermediates` has that one 1x1 stage only: a
  method that needs intermediate stages (auxiliary heads, uskd's weak stage) refuses it in one line.
- `timm` / `timm:TAG` weights (runs/weights.py) come through timm's own download and cache (the Hugging Face hub).
"""

from __future__ import annotations

import difflib
from typing import Optional

import torch
from torch import nn

from ..errors import UserError, one_line
from .base import ClassifierBase

PREFIX = "timm:"
MAX_STAGES = 4  # intermediate maps taken (a ViT reports one per block)
INSTALL = "pip install 'ipasdctl[timm]'"


def is_timm_arch(arch: str) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)


def import_timm():
    try:
        import timm
    except ImportError:
        raise UserError(f"--arch timm:<name> needs timm, which is not installed: {INSTALL}") from None
    return timm


def check_timm_name(name: str) -> str:
    """The timm model name, or a UserError with the closest names timm has."""
    timm = import_timm()
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise UserError(f"timm has no model '{name}'{hint}; list them with `ipasdctl list --models 'timm:*{name[:6]}*'`")
    return name


class TimmClassifier(ClassifierBase):
    def __init__(self, name: str, num_classes: int, body: Optional[nn.Module] = None):
        super().__init__()
        timm = import_timm()
        self.body = body if body is not None else timm.create_model(check_timm_name(name), pretrained=False,
                                                                    num_classes=0)
        self.embed_dim = int(getattr(self.body, "head_hidden_size", None) or self.body.num_features)
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        self.default_input_size = int((cfg.get("input_size") or (3, 224, 224))[-1])
        info = getattr(self.body, "feature_info", None) or []
        channels = [int(f["num_chs"]) for f in info][-MAX_STAGES:] if hasattr(self.body, "forward_intermediates") else []
        self.num_intermediates = len(channels)
        # the embedding as a last 1x1 stage unless the last map is exactly what is pooled into it
        self.embedding_stage = True
        if channels and channels[-1] == self.embed_dim:
            self.embedding_stage = not self._last_map_pools_into_embedding()
        self.stage_channels = channels + ([self.embed_dim] if self.embedding_stage else [])

    def _last_map_pools_into_embedding(self) -> bool:
        """One probe at the model's own input size: is avgpool(last intermediate map) the embedding? (A norm or a
        convolution after pooling makes it not.) On the meta device (`list --models`) nothing can be compared."""
        weight = next(self.body.parameters(), None)
        if weight is None or weight.is_meta:
            return False
        was_training = self.body.training
        self.body.eval()
        size = self.default_input_size
        with torch.no_grad():
            final, stages = self.body.forward_intermediates(torch.randn(1, 3, size, size, device=weight.device,
                                                                        generator=torch.Generator().manual_seed(0)),
                                                            indices=self.num_intermediates)
            embedding = self.body.forward_head(final, pre_logits=True)
            last = stages[-1]
            same = last.dim() == 4 and torch.allclose(last.mean((2, 3)), embedding, rtol=1e-4, atol=1e-5)
        self.body.train(was_training)
        return bool(same)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        if not with_features:
            return self.classifier(self.body(x))
        if self.num_intermediates:
            final, stages = self.body.forward_intermediates(x, indices=self.num_intermediates)
            stages = list(stages)
        else:
            final, stages = self.body.forward_features(x), []
        embedding = self.body.forward_head(final, pre_logits=True)
        if self.embedding_stage:
            stages.append(embedding[:, :, None, None])
        return self.classifier(embedding), embedding, stages


def build_timm_model(arch: str, num_classes: int) -> TimmClassifier:
    return TimmClassifier(arch[len(PREFIX):], num_classes)


def timm_model_names(pattern: str) -> list[str]:
    """`timm:` + every timm model name matching the glob after the prefix (`timm:*mobilenet*`)."""
    timm = import_timm()
    return [PREFIX + name for name in timm.list_models(pattern[len(PREFIX):] if is_timm_arch(pattern) else pattern)]


def timm_pretrained_state(arch: str, tag: Optional[str], spec: str) -> tuple[dict, dict]:
    """(the state dict of timm's pretrained `arch` in the wrapper's names, {"mean", "std", "input_size", "sha256"})
    through timm's own download and cache; offline with nothing cached is one line naming the cache folder."""
    if not is_timm_arch(arch):
        raise UserError(f"model.weights={spec} is for timm architectures (--arch timm:<name>); {arch} is not one: "
                        "give a weights file or a run folder instead")
    timm = import_timm()
    name = check_timm_name(arch[len(PREFIX):])
    full = f"{name}.{tag}" if tag else name
    try:
        body = timm.create_model(full, pretrained=True, num_classes=0)
    except Exception as exc:  # offline, an unknown tag, a model without pretrained weights
        from huggingface_hub.constants import HF_HUB_CACHE

        cfg = timm.models.get_pretrained_cfg(full) if hasattr(timm.models, "get_pretrained_cfg") else None
        where = f"the Hugging Face repo {cfg.hf_hub_id}" if cfg is not None and getattr(cfg, "hf_hub_id", None) \
            else "its weights file"
        raise UserError(f"model.weights={spec}: timm could not load pretrained {full} ({type(exc).__name__}: "
                        f"{one_line(exc, 80)}); offline, place {where} in the hub cache {HF_HUB_CACHE} (HF_HOME sets "
                        "it), or give a weights file") from None
    wrapped = TimmClassifier(name, 1, body=body)
    state = {key: value for key, value in wrapped.state_dict().items() if not key.startswith("classifier.")}
    cfg = body.pretrained_cfg or {}
    meta = {"mean": [float(v) for v in cfg.get("mean", ())] or None, "std": [float(v) for v in cfg.get("std", ())] or None,
            "input_size": int(cfg["input_size"][-1]) if cfg.get("input_size") else None, "sha256": None}
    return state, meta
