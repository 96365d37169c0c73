"""Vision Transformer: ``PatchEmbedding``, ``VisionTransformerConfig``, ``VisionTransformer``.

An image [B, C, H, W] is cut into non-overlapping P x P patches, each projected to d_model (a strided
convolution, ``PatchEmbedding``); a learnable ``[CLS]`` token may be prepended; learned positions are
added; encoder blocks mix the tokens; a final norm, then the head reads the ``[CLS]`` token
(``pool="cls"``) or the mean of the tokens (``pool="mean"``) (Dosovitskiy et al., 2020)::

    x = patch_embed(images)                      # [B, N, D], N = (H / P) * (W / P), row-major patches
    x = concat(cls, x) + pos_embed               # [B, N + 1, D]
    for block in layers: x = block(x)            # EncoderBlock (attention) or MixerEncoderBlock
    logits = head(pool(final_norm(x)))           # [B, num_classes]

The configuration's names and defaults are those of the JAX ViT configs (``VisionTransformerConfig``:
ViT-Base/16 on 224 x 224 RGB). Two things are seqblocks' own:

- ``token_mixer``: "attention" (the default) builds ``EncoderBlock`` s, bidirectional softmax
  attention with every ``EncoderBlock`` option; any other registered mixer name ("mamba", "s5",
  "lru", "gla", ...) builds ``MixerEncoderBlock`` s, the same pre-norm layout with that mixer in
  place of attention. A causal mixer is made bidirectional (``bidirectional=True``: a forward and a
  reversed pass with their own parameters, ``seqblocks.layers.bidirectional.Bidirectional``), so
  ``token_mixer="mamba"`` is a Vision-Mamba-style model. ``mixer_kwargs`` reach the mixer's config.
- ``channels_last``: take [B, H, W, C] images (the JAX layout) instead of PyTorch's [B, C, H, W].

``VisionTransformer`` saves and loads with ``save_pretrained`` / ``from_pretrained`` (safetensors and
``config.json``, see ``seqblocks.checkpoint``).

Shapes: B batch, C channels, H height, W width, P patch, N patches, D width, K classes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.blocks.encoder_decoder import FF_ACTIVATIONS, EncoderBlock, FeedForward, block_norm
from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.adapters import call_any_mixer
from seqblocks.layers.bidirectional import Bidirectional
from seqblocks.models.transformer_config import NORM_KINDS
from seqblocks.registry import MIXERS, MODELS

__all__ = ["PatchEmbedding", "VisionTransformerConfig", "VisionTransformer", "MixerEncoderBlock", "POOLS"]

POOLS = ("cls", "mean")
_DEFAULT_D_STATE = 16


def _pair(owner: str, name: str, value: Any) -> tuple[int, int]:
    """``(value, value)`` for an int, the pair itself for a pair of ints."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in pair)):
        raise ValueError(f"{owner}: {name}={value!r} must be a positive int or a pair (height, width) of them")
    return int(pair[0]), int(pair[1])


class PatchEmbedding(nn.Module):
    """Cut an image into non-overlapping patches and project each to ``d_model``.

    A convolution with kernel and stride ``patch_size``: token n is the patch at grid row n // gw,
    column n % gw (row-major), its C * Ph * Pw pixels (channel-major) times the projection.

    Args:
        image_size (int | tuple[int, int]): H and W (one int for a square image).
        patch_size (int | tuple[int, int]): Ph and Pw; must divide the image size.
        num_channels (int): C.
        d_model (int): D.
        channels_last (bool): take [B, H, W, C] images instead of [B, C, H, W]. Default: False.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: sizes that are not positive, or an image size the patch size does not divide.
    """

    def __init__(self, image_size: int | tuple[int, int], patch_size: int | tuple[int, int], num_channels: int,
                 d_model: int, *, channels_last: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        img_h, img_w = _pair("PatchEmbedding", "image_size", image_size)
        patch_h, patch_w = _pair("PatchEmbedding", "patch_size", patch_size)
        for name, value in (("num_channels", num_channels), ("d_model", d_model)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PatchEmbedding: {name}={value!r} must be a positive int")
        if img_h % patch_h or img_w % patch_w:
            raise ValueError(f"PatchEmbedding: image_size {(img_h, img_w)} must be divisible by patch_size "
                             f"{(patch_h, patch_w)} along both axes")
        self.image_size, self.patch_size = (img_h, img_w), (patch_h, patch_w)
        self.num_channels, self.d_model, self.channels_last = num_channels, d_model, channels_last
        self.grid_size = (img_h // patch_h, img_w // patch_w)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(num_channels, d_model, kernel_size=self.patch_size, stride=self.patch_size,
                              device=device, dtype=dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] (or [B, H, W, C] with ``channels_last``) -> tokens [B, N, D]."""
        C, (H, W) = self.num_channels, self.image_size
        expected = (H, W, C) if self.channels_last else (C, H, W)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            layout = "[B, H, W, C]" if self.channels_last else "[B, C, H, W]"
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"PatchEmbedding: expected images {layout} = [B, {', '.join(map(str, expected))}], "
                             f"got {got}")
        if not images.is_floating_point():
            raise TypeError(f"PatchEmbedding: images must be floating point, got {images.dtype}")
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)
        x = self.proj(images.to(self.proj.weight.dtype))  # [B, D, gh, gw]
        return x.flatten(2).transpose(1, 2)  # [B, N, D]


@dataclasses.dataclass(frozen=True, kw_only=True)
class VisionTransformerConfig:
    """Vision Transformer hyperparameters; the defaults are ViT-Base/16 on 224 x 224 RGB images.

    Args:
        image_size (int | tuple[int, int]): H and W. Default: 224.
        patch_size (int | tuple[int, int]): must divide ``image_size``. Default: 16.
        num_channels (int): image channels. Default: 3.
        num_classes (int | None): classes of the head; None: no head, ``forward`` returns the tokens.
            Default: None.
        use_cls_token (bool): prepend a learnable ``[CLS]`` token. Default: True.
        pool (str): what the head reads: "cls" (the ``[CLS]`` token) or "mean" (mean of all tokens).
            Default: "cls".
        d_model (int): width. Default: 768.
        num_heads (int): attention heads. Default: 12.
        num_layers (int): blocks. Default: 12.
        d_ff (int): feed-forward width. Default: 3072.
        dropout_rate (float): dropout on the embeddings, attention probabilities and sublayer outputs.
            Default: 0.0.
        use_pre_norm (bool): pre-norm blocks. Default: True.
        ff_activation (str): "gelu", "relu", "swiglu", "geglu", ... Default: "gelu".
        norm_type (str): "layer" or "rms" (or "layer_norm" / "rms_norm"). Default: "layer".
        attention_type (str): attention backend (``MHA``'s ``attention_type``). Default: "standard".
        attention_block_size (int): key block of "memory_efficient". Default: 512.
        linear_attention_chunk_size (int): chunk of "linear". Default: 64.
        num_kv_heads (int | None): key/value heads (GQA). Default: None (num_heads).
        attention_window (int | None): causal sliding window of the attention. Default: None.
        token_mixer (str): "attention", or a registered mixer name (``seqblocks list``) to mix the
            tokens instead. Default: "attention".
        mixer_kwargs (dict): config values of that mixer (``{"d_state": 32}``); a mixer whose config
            requires ``d_state`` (the LTI mixers) gets 16 unless given here. Default: {}.
        bidirectional (bool): wrap a causal ``token_mixer`` in a forward + reversed pass. Default: True.
        channels_last (bool): images are [B, H, W, C]. Default: False.

    Raises:
        ValueError: an image size the patch size does not divide, ``pool="cls"`` without the ``[CLS]``
            token, an unknown pool / norm / activation / mixer, sizes that are not positive.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    num_channels: int = 3
    num_classes: int | None = None
    use_cls_token: bool = True
    pool: str = "cls"
    d_model: int = 768
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 3072
    dropout_rate: float = 0.0
    use_pre_norm: bool = True
    ff_activation: str = "gelu"
    norm_type: str = "layer"
    attention_type: str = "standard"
    attention_block_size: int = 512
    linear_attention_chunk_size: int = 64
    num_kv_heads: int | None = None
    attention_window: int | None = None
    token_mixer: str = "attention"
    mixer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    bidirectional: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        owner = "VisionTransformerConfig"
        if isinstance(self.attention_type, enum.Enum):
            object.__setattr__(self, "attention_type", self.attention_type.value)
        img = _pair(owner, "image_size", self.image_size)
        patch = _pair(owner, "patch_size", self.patch_size)
        # JSON turns a pair into a list; keep tuples so equal configs compare equal.
        object.__setattr__(self, "image_size", self.image_size if isinstance(self.image_size, int) else img)
        object.__setattr__(self, "patch_size", self.patch_size if isinstance(self.patch_size, int) else patch)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"{owner}: image_size {img} must be divisible by patch_size {patch} along both axes")
        for name in ("num_channels", "d_model", "num_heads", "num_layers", "d_ff", "attention_block_size",
                     "linear_attention_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{owner}: {name}={value!r} must be a positive int")
        for name in ("num_classes", "num_kv_heads", "attention_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{owner}: {name}={value!r} must be a positive int or None")
        if self.pool not in POOLS:
            raise ValueError(f"{owner}: pool={self.pool!r}; expected one of {POOLS}")
        if self.pool == "cls" and not self.use_cls_token:
            raise ValueError(f"{owner}: pool='cls' needs use_cls_token=True; set pool='mean' or enable the CLS "
                             f"token")
        if not isinstance(self.dropout_rate, int | float) or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"{owner}: dropout_rate={self.dropout_rate!r} must lie in [0, 1)")
        if self.norm_type not in NORM_KINDS:
            raise ValueError(f"{owner}: norm_type={self.norm_type!r}; expected one of {tuple(NORM_KINDS)}")
        if self.ff_activation not in FF_ACTIVATIONS:
            raise ValueError(f"{owner}: ff_activation={self.ff_activation!r}; expected one of {FF_ACTIVATIONS}")
        if not isinstance(self.token_mixer, str) or (self.token_mixer != "attention"
                                                     and self.token_mixer not in MIXERS):
            raise ValueError(f"{owner}: token_mixer={self.token_mixer!r}; expected 'attention' or a registered "
                             f"mixer: {MIXERS.keys()}")
        if not isinstance(self.mixer_kwargs, dict):
            raise ValueError(f"{owner}: mixer_kwargs must be a dict, got {type(self.mixer_kwargs).__name__}")
        if self.token_mixer == "attention" and self.mixer_kwargs:
            raise ValueError(f"{owner}: mixer_kwargs={self.mixer_kwargs} serve a token_mixer other than "
                             f"'attention' (the attention takes this config's own fields)")
        if self.d_model % self.num_heads and self.token_mixer == "attention":
            raise ValueError(f"{owner}: d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")

    @property
    def num_patches(self) -> int:
        """N: patches per image."""
        (h, w), (ph, pw) = _pair("", "", self.image_size), _pair("", "", self.patch_size)
        return (h // ph) * (w // pw)

    @property
    def num_tokens(self) -> int:
        """Tokens the blocks see: the patches, plus the ``[CLS]`` token."""
        return self.num_patches + int(self.use_cls_token)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON values (pairs as lists)."""
        data = dataclasses.asdict(self)
        for name in ("image_size", "patch_size"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionTransformerConfig:
        """The config ``to_dict`` wrote.

        Raises:
            ValueError: unknown keys (listing the valid ones) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"VisionTransformerConfig.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"VisionTransformerConfig: unknown keys {unknown}; valid: {sorted(names)}")
        data = {k: (tuple(v) if k in ("image_size", "patch_size") and isinstance(v, list) else v)
                for k, v in data.items()}
        return cls(**data)


class MixerEncoderBlock(nn.Module):
    """``EncoderBlock``'s layout with any mixer in place of self-attention::

        pre_norm=True:  x = x + mixer(ln1(x));   x = x + ffn(ln2(x))
        pre_norm=False: x = ln1(x + mixer(x));   x = ln2(x + ffn(x))

    Args:
        mixer (nn.Module): [B, T, D] -> [B, T, D] (a seqblocks ``Mixer`` or a plain module).
        d_model (int): D.
        d_ff (int): FFN width.
        dropout_rate (float): dropout on each sublayer's output (training only). Default: 0.0.
        pre_norm (bool): Default: True.
        norm_type (str): norm registry name. Default: "layer_norm".
        ff_activation (str): as ``EncoderBlock``. Default: "gelu".
        norm_eps (float): Default: 1e-5.
        device, dtype: parameter placement. Default: None.
    """

    def __init__(self, mixer: nn.Module, d_model: int, d_ff: int, dropout_rate: float = 0.0, pre_norm: bool = True,
                 norm_type: str = "layer_norm", ff_activation: str = "gelu", norm_eps: float = 1e-5, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.ln1 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.mixer = mixer
        self.ln2 = block_norm(norm_type, d_model, norm_eps, device, dtype)
        self.ffn = FeedForward(d_model, d_ff, ff_activation, True, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout_rate)

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        return call_any_mixer(self.mixer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]."""
        if self.pre_norm:
            x = x + self.dropout(self._mix(self.ln1(x)))
            return x + self.dropout(self.ffn(self.ln2(x)))
        x = self.ln1(x + self.dropout(self._mix(x)))
        return self.ln2(x + self.dropout(self.ffn(x)))


def _token_mixer(config: VisionTransformerConfig, layer_idx: int, device, dtype) -> nn.Module:
    """Layer ``layer_idx``'s ``token_mixer`` (a registered mixer), made bidirectional when it is causal."""
    from seqblocks.layers.build import build_mixer, is_block_config_mixer, mixer_class, mixer_config

    name = config.token_mixer
    cls = mixer_class(name)
    d_state = None
    if not is_block_config_mixer(cls):
        # A state width the mixer's config requires (the LTI mixers') defaults to 16 here.
        fields = {f.name: f for f in dataclasses.fields(cls.config_class())}
        if "d_state" in fields and fields["d_state"].default is dataclasses.MISSING:
            d_state = _DEFAULT_D_STATE
    cfg = mixer_config(name, config.d_model, d_state=d_state, kwargs=dict(config.mixer_kwargs), causal=False)

    def one() -> nn.Module:
        return build_mixer(name, cfg, layer_idx=layer_idx, device=device, dtype=dtype, causal=False)

    mixer = one()
    if config.bidirectional and getattr(mixer, "causal", True):
        mixer = Bidirectional(mixer, one())
    return mixer


@MODELS.register("VisionTransformer")
class VisionTransformer(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "vision"]):
    """Vision Transformer (or a Vision-Mamba-style model with another ``token_mixer``) image classifier.

    Args:
        config (VisionTransformerConfig): the model.
        device, dtype: parameter placement. Default: None.

    Attributes: ``patch_embed``, ``cls_token`` ([1, 1, D] or None), ``pos_embed`` ([1, N (+1), D]),
    ``layers``, ``final_norm``, ``head`` (None without ``num_classes``).
    """

    def __init__(self, config: VisionTransformerConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, VisionTransformerConfig):
            raise TypeError(f"VisionTransformer expects a VisionTransformerConfig, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        D = config.d_model
        self.patch_embed = PatchEmbedding(config.image_size, config.patch_size, config.num_channels, D,
                                          channels_last=config.channels_last, **factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D, **factory)) if config.use_cls_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, config.num_tokens, D, **factory))
        self.dropout = nn.Dropout(config.dropout_rate)
        norm_type = NORM_KINDS[config.norm_type]
        if config.token_mixer == "attention":
            self.layers = nn.ModuleList(
                EncoderBlock(D, config.num_heads, config.d_ff, config.dropout_rate, config.use_pre_norm,
                             config.attention_type, config.attention_block_size, config.linear_attention_chunk_size,
                             norm_type, config.ff_activation, config.num_kv_heads, config.attention_window,
                             layer_idx=i, **factory)
                for i in range(config.num_layers))
        else:
            self.layers = nn.ModuleList(
                MixerEncoderBlock(_token_mixer(config, i, device, dtype), D, config.d_ff, config.dropout_rate,
                                  config.use_pre_norm, norm_type, config.ff_activation, **factory)
                for i in range(config.num_layers))
        self.final_norm = block_norm(norm_type, D, 1e-5, device, dtype)
        self.head = nn.Linear(D, config.num_classes, **factory) if config.num_classes is not None else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) ``[CLS]`` token and positions; a zero head (every class starts
        equally likely)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def mixers(self) -> list[nn.Module]:
        """The token mixer of each layer (what the model card lists)."""
        return [layer.attn if isinstance(layer, EncoderBlock) else layer.mixer for layer in self.layers]

    def forward_features(self, images: torch.Tensor, score_mod: Callable | None = None) -> torch.Tensor:
        """images -> the final-norm tokens [B, N (+1), D] (the ``[CLS]`` token first).

        ``score_mod``: a per-call score mod (or mask mod) of every attention block.
        """
        x = self.patch_embed(images)  # [B, N, D]
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = self.dropout(x + self.pos_embed.to(x.dtype))
        if score_mod is not None and self.config.token_mixer != "attention":
            raise ValueError(f"VisionTransformer: score_mod acts on attention; token_mixer="
                             f"{self.config.token_mixer!r} has none")
        for layer in self.layers:
            x = layer(x, score_mod=score_mod) if score_mod is not None else layer(x)
        return self.final_norm(x)

    def forward(self, images: torch.Tensor, score_mod: Callable | None = None) -> torch.Tensor:
        """images [B, C, H, W] (or [B, H, W, C] with ``channels_last``) -> logits [B, K], or without
        ``num_classes`` the tokens [B, N (+1), D].

        Args:
            images (Tensor): the batch of images, floating point.
            score_mod (Callable | None): a per-call score mod (or mask mod) of every attention block.
                Default: None.
        """
        x = self.forward_features(images, score_mod)
        if self.head is None:
            return x
        pooled = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)
        return self.head(pooled)

    def checkpoint_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> VisionTransformer:
        return cls(VisionTransformerConfig.from_dict(config), device=device, dtype=dtype)
