"""The PhysEncoder's trainable physical head, its config, and its checkpoint file.

PhysMaster (arXiv 2510.13809) puts a randomly initialised *physical head* on a frozen image backbone (DINOv2) and
feeds its output, the physical embedding `c_phys`, to the DiT beside the text and image conditions. The paper does
not give the head's shape; this is ours:

    backbone hidden states [B, P, C_in]  (or K layers stacked: [B, K, P, C_in], mixed by learned softmax weights)
      -> LayerNorm -> Linear(C_in -> d)                       (keys/values)
    N learned queries [N, d]
      -> `depth` x (cross-attention to the patch tokens, then an MLP), pre-norm, residual
      -> LayerNorm -> Linear(d -> D_ctx) x gain              physical tokens [B, N, D_ctx]

Why this shape:
- *Learned queries* (a Perceiver-resampler) make the token count N independent of the backbone's patch count
  (257 for CLIP at 224 px, 1370 for DINOv2 at 518 px) and of the image's aspect, so one head works with any input
  size, and the DiT's cost grows by N tokens only (16 tokens beside Wan's 512 text tokens: +3% context).
- *Cross-attention over all patch tokens* lets each query pool where the objects are, which a global (CLS) vector
  loses: physics depends on where things are and what they rest on.
- *Output in the text encoder's width* (4096 for umT5/T5-XXL/LLaMA), so the tokens ride on the conditioning every
  native I2V model already projects (Wan's text_embedding, LTX's caption_projection), and ComfyUI's samplers need
  no change. `gain` starts small (0.1) so a fresh head perturbs a pretrained model gently; it is learned.
- Cost: O(N * P * d) per image, once per video, negligible beside one DiT step.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, WidthMismatchError
from .errors import describe as _show
from .fileio import atomic_path

FORMAT_VERSION = 1
CONFIG_KEY = "physmaster.config"
PROVENANCE_KEY = "physmaster.provenance"

#: which hidden states of a CLIP_VISION_OUTPUT the head reads (see `select_features`).
FEATURES = ("penultimate", "last", "penultimate+last")

#: backbone widths ComfyUI's CLIPVisionLoader produces, for hints in error messages.
KNOWN_BACKBONES = {
    1024: "CLIP ViT-L/14 or DINOv2-L",
    1280: "CLIP ViT-H/14 (Wan's clip_vision_h)",
    1536: "DINOv2-G",
    1664: "CLIP ViT-bigG/14",
    1152: "SigLIP so400m",
}


def backbone_hint(width: int) -> str:
    return KNOWN_BACKBONES.get(int(width), f"a {width}-wide backbone")


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a physical head. Stored as JSON in the checkpoint's `physmaster.config` metadata."""

    in_dim: int  # backbone width C_in
    context_dim: int = 4096  # the I2V model's text-context width D_ctx
    num_tokens: int = 16  # N physical tokens
    hidden_dim: int = 512  # d, the head's own width
    depth: int = 2  # cross-attention + MLP blocks
    heads: int = 8
    mlp_ratio: float = 4.0
    feature: str = "penultimate"  # which CLIP_VISION_OUTPUT hidden states (FEATURES)
    backbone: str = ""  # a hint of which backbone it was made for, e.g. "clip_vision_h"
    init_gain: float = 0.1
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # A config comes from a user's widgets or from a file someone may have edited: check every field's type
        # (no coercion: bool is not an int, "1" is not 1) and bound it, so no config can ask for absurd memory.
        problems = []
        for name, most in INT_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= most:
                problems.append(f"{name} must be a whole number 1..{most}, got {_show(value)}")
        if type(self.hidden_dim) is int and type(self.heads) is int and self.heads > 0 and self.hidden_dim % self.heads:
            problems.append(f"hidden_dim ({self.hidden_dim}) must be a multiple of heads ({self.heads})")
        if type(self.feature) is not str or self.feature not in FEATURES:
            problems.append(f"feature must be one of {', '.join(FEATURES)}, got {_show(self.feature)}")
        if type(self.backbone) is not str or len(self.backbone) > 256:
            problems.append(f"backbone must be a short text (a hint like 'clip_vision_h'), got {_show(self.backbone)}")
        if not (_is_number(self.mlp_ratio) and 0 < self.mlp_ratio <= MAX_MLP_RATIO):
            problems.append(f"mlp_ratio must be a number > 0 and <= {MAX_MLP_RATIO}, got {_show(self.mlp_ratio)}")
        elif type(self.hidden_dim) is int and int(self.hidden_dim * self.mlp_ratio) < 1:
            problems.append(f"mlp_ratio {self.mlp_ratio} leaves the MLP of a {self.hidden_dim}-wide head no width")
        if not _is_number(self.init_gain):
            problems.append(f"init_gain must be a finite number, got {_show(self.init_gain)}")
        if type(self.format_version) is not int or self.format_version < 1:
            problems.append(f"format_version must be a whole number >= 1, got {_show(self.format_version)}")
        elif self.format_version > FORMAT_VERSION:
            problems.append(f"format_version {self.format_version} is newer than this PhysMaster reads "
                            f"({FORMAT_VERSION}); update the PhysMaster node pack")
        if problems:
            raise CheckpointError("invalid PhysMaster head config: " + "; ".join(problems))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight of a head with this config and its shape, computed on the meta device (nothing is
        allocated): what a checkpoint must hold, and (times 4 bytes each) what a new head will take."""
        return {k: tuple(v.shape) for k, v in _meta_head(self).state_dict().items()}

    @property
    def in_layers(self) -> int:
        return 2 if self.feature == "penultimate+last" else 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        if not isinstance(text, str) or len(text) > MAX_CONFIG_CHARS:
            raise CheckpointError(f"physmaster.config metadata must be JSON text of at most {MAX_CONFIG_CHARS} "
                                  f"characters, got {len(text) if isinstance(text, str) else type(text).__name__}")
        try:
            data = _loads(text)
        except ValueError as e:
            raise CheckpointError(f"physmaster.config metadata is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CheckpointError("physmaster.config metadata must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"physmaster.config has unknown fields {unknown[:10]}; it was written by a newer "
                                  "PhysMaster: update the node pack")
        missing = [n for n in ("in_dim",) if n not in data]
        if missing:
            raise CheckpointError(f"physmaster.config lacks {missing}")
        try:
            return cls(**data)
        except TypeError as e:
            raise CheckpointError(f"physmaster.config is malformed: {e}") from None


#: bounds on a head config (far above any real head; they keep a forged config from asking for absurd memory)
INT_LIMITS = {"in_dim": 65536, "context_dim": 65536, "num_tokens": 4096, "hidden_dim": 16384, "depth": 64,
              "heads": 256}
MAX_MLP_RATIO = 64.0
MAX_CONFIG_CHARS = 64 * 1024
MAX_PROVENANCE_CHARS = 4 * 1024 * 1024
#: safetensors dtypes a head's weights may have
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _loads(text: str) -> Any:
    """json.loads for metadata from a file: no NaN/Infinity; nesting too deep is a ValueError, not a crash."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, d = q.shape
        h = self.heads
        query = self.to_q(self.norm_q(q)).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.to_kv(self.norm_kv(kv)).chunk(2, dim=-1)
        k = k.reshape(b, -1, h, d // h).transpose(1, 2)
        v = v.reshape(b, -1, h, d // h).transpose(1, 2)
        attn = F.scaled_dot_product_attention(query, k, v)
        q = q + self.to_out(attn.transpose(1, 2).reshape(b, n, d))
        return q + self.mlp(self.norm_mlp(q))


class PhysHead(nn.Module):
    """Backbone hidden states -> N physical tokens in the I2V model's context width."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        c = config
        self.layer_logits = nn.Parameter(torch.zeros(c.in_layers))
        self.in_norm = nn.LayerNorm(c.in_dim)
        self.in_proj = nn.Linear(c.in_dim, c.hidden_dim)
        self.queries = nn.Parameter(torch.randn(c.num_tokens, c.hidden_dim) / math.sqrt(c.hidden_dim))
        self.blocks = nn.ModuleList(_Block(c.hidden_dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.hidden_dim)
        self.out_proj = nn.Linear(c.hidden_dim, c.context_dim)
        self.gain = nn.Parameter(torch.tensor(float(c.init_gain)))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def create(cls, config: HeadConfig, seed: int = 0) -> "PhysHead":
        """A fresh head whose weights depend only on `config` and `seed` (not on the global RNG)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return cls(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        c = self.config
        if hidden.ndim == 3 and c.in_layers == 1:
            hidden = hidden.unsqueeze(1)
        if hidden.ndim != 4 or hidden.shape[1] != c.in_layers:
            want = "[B, P, C]" if c.in_layers == 1 else f"[B, {c.in_layers}, P, C]"
            raise WidthMismatchError(f"physical head expects backbone hidden states shaped {want}, "
                                     f"got {list(hidden.shape)}")
        if hidden.shape[-1] != c.in_dim:
            raise WidthMismatchError(
                f"backbone features are {hidden.shape[-1]} wide ({backbone_hint(hidden.shape[-1])}) but this "
                f"PhysMaster encoder expects {c.in_dim} ({c.backbone or backbone_hint(c.in_dim)}). Load the "
                f"backbone it was made for in CLIPVisionLoader, or make a new encoder with PhysMasterEncoderNew.")
        param = self.in_proj.weight
        hidden = hidden.to(device=param.device, dtype=param.dtype)
        weights = torch.softmax(self.layer_logits, dim=0)
        x = torch.einsum("k,bkpc->bpc", weights, hidden)
        kv = self.in_proj(self.in_norm(x))
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, kv)
        return self.out_proj(self.out_norm(q)) * self.gain


def _meta_head(config: HeadConfig) -> PhysHead:
    """A head with this config on the meta device: shapes only, no memory and no time (the config is bounded)."""
    with torch.device("meta"):
        return PhysHead(config)


def select_features(hidden_states: dict[str, Any], feature: str) -> torch.Tensor:
    """Pick the backbone hidden states the head reads from a CLIP_VISION_OUTPUT-like mapping.

    `penultimate` (default) is ComfyUI's `penultimate_hidden_states`: the second-to-last transformer layer, before
    the final norm, all tokens (CLS + patches, and registers if any). It is what Wan feeds its own image
    projection, and penultimate features are the more general ones (less shaped by the backbone's training
    objective). `last` is `last_hidden_state` (after the final norm). `penultimate+last` stacks both.
    """
    def get(key: str) -> torch.Tensor:
        try:
            value = hidden_states[key]
        except (KeyError, AttributeError):
            value = getattr(hidden_states, key, None)
        if value is None:
            raise WidthMismatchError(f"the CLIP vision output has no {key}; connect the output of a core "
                                     "CLIPVisionEncode node")
        return value

    if feature == "penultimate":
        return get("penultimate_hidden_states")
    if feature == "last":
        return get("last_hidden_state")
    if feature == "penultimate+last":
        return torch.stack([get("penultimate_hidden_states"), get("last_hidden_state")], dim=1)
    raise WidthMismatchError(f"unknown feature {feature!r}; expected one of {FEATURES}")


@dataclass
class PhysEncoder:
    """A physical head with its config and provenance: what the PHYSMASTER_ENCODER socket carries."""

    head: PhysHead
    provenance: dict[str, Any] = field(default_factory=dict)
    name: str = "new"

    @property
    def config(self) -> HeadConfig:
        return self.head.config

    @classmethod
    def new(cls, config: HeadConfig, seed: int = 0, name: str = "new") -> "PhysEncoder":
        prov = {"stages": [], "seed": int(seed), "created": _now()}
        return cls(PhysHead.create(config, seed), prov, name)

    @property
    def encoder_id(self) -> str:
        """Name plus a short hash of the weights: which head made a set of tokens.

        Hashing ~36 MB of weights costs tens of ms, so the digest is kept until a weight changes (an in-place
        update of a tensor bumps its version counter: an optimizer step, load_state_dict)."""
        state = self.head.state_dict()
        # inference tensors (a head made under ComfyUI's inference mode) have no version counter; they are never
        # trained in place (the trainers clone the encoder first), so their storage identifies them
        versions = tuple((v.data_ptr(), -1 if v.is_inference() else v._version) for v in state.values())
        cached = getattr(self, "_id_cache", None)
        if cached is None or cached[0] != versions:
            h = hashlib.sha256(self.config.to_json().encode())
            for k, v in sorted(state.items()):
                h.update(k.encode())
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            cached = (versions, h.hexdigest()[:12])
            self._id_cache = cached
        return f"{self.name}:{cached[1]}"

    def clone(self) -> "PhysEncoder":
        head = PhysHead(self.config)
        head.load_state_dict(self.head.state_dict())
        return PhysEncoder(head, json.loads(json.dumps(self.provenance)), self.name)

    @torch.no_grad()
    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        was_training = self.head.training
        self.head.eval()
        try:
            return self.head(hidden)
        finally:
            self.head.train(was_training)

    def save(self, path: str | os.PathLike) -> Path:
        return save_encoder(self, path)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def save_encoder(encoder: PhysEncoder, path: str | os.PathLike) -> Path:
    """Write one .safetensors file (weights + config + provenance metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in encoder.head.state_dict().items()}
    metadata = {
        "format": "pt",
        CONFIG_KEY: encoder.config.to_json(),
        PROVENANCE_KEY: json.dumps(encoder.provenance, sort_keys=True, default=str),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors header metadata of `path`, with a clear error for anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PhysMaster encoder file not found: {path}. Put it in ComfyUI/models/physmaster/ "
                              "and refresh the node (press R), or create one with PhysMasterEncoderNew.")
    size = path.stat().st_size
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path.name} is not a readable .safetensors file ({size} bytes; {e}). It may be "
                              "truncated by an interrupted download or copy: copy it again.") from None


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> PhysEncoder:
    """Load and validate a PhysEncoder checkpoint.

    Everything the file claims is checked before memory is allocated for it: the config's fields (types and
    bounds), then the header's tensor names, shapes and dtypes against the config (on the meta device); only then
    are the weights read, and non-finite weights are refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path.name} is a .safetensors file but not a PhysMaster encoder (it has no "
                              f"{CONFIG_KEY} metadata). Put model, LoRA or CLIP vision files in their own "
                              "folders; models/physmaster/ holds encoders made by PhysMasterEncoderSave.")
    try:
        config = HeadConfig.from_json(meta[CONFIG_KEY])
    except CheckpointError as e:
        raise CheckpointError(f"{path.name}: {e}") from None
    text = meta.get(PROVENANCE_KEY, "{}")
    try:
        if len(text) > MAX_PROVENANCE_CHARS:
            raise ValueError(f"{len(text)} characters, more than {MAX_PROVENANCE_CHARS}")
        provenance = _loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path.name}: {PROVENANCE_KEY} metadata is not valid JSON ({e})") from None
    if not isinstance(provenance, dict):
        raise CheckpointError(f"{path.name}: {PROVENANCE_KEY} metadata must be a JSON object")

    head = _meta_head(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            header = {}
            for k in f.keys():
                view = f.get_slice(k)
                header[k] = (tuple(view.get_shape()), str(view.get_dtype()))
    except Exception as e:
        raise CheckpointError(f"{path.name}: the tensor header cannot be read ({e}); copy the file again") from None
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = sorted(k for k in set(expected) & set(header) if header[k][0] != expected[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append("wrong shapes " + ", ".join(
                f"{k} {list(header[k][0])} (config says {list(expected[k])})" for k in wrong[:5]))
        raise CheckpointError(f"{path.name}: weights do not match its physmaster.config: " + "; ".join(parts))
    not_float = sorted(k for k, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES)
    if not_float:
        raise CheckpointError(f"{path.name}: weights {not_float[:5]} are {header[not_float[0]][1]}, not floating "
                              "point; this is not a PhysMaster encoder's file")

    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path.name}: the weights cannot be read ({e}); the file is probably truncated: "
                              "copy it again.") from None
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise CheckpointError(f"{path.name}: weights {bad[:5]} hold NaN or infinite values (a damaged file, or "
                              "one saved from a training run that diverged); use an earlier encoder file")
    params = head.state_dict()
    head.load_state_dict({k: v.to(params[k].dtype) for k, v in tensors.items()}, assign=True)
    head.to(device)
    return PhysEncoder(head, provenance, path.stem)
