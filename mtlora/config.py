"""Model configuration: the Swin backbone, the adapters, the tasks and the decoders.

Configs are typed dataclasses checked in `__post_init__` and saved as sorted
JSON next to the weights, so a checkpoint describes itself without pickle.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from mtlora.errors import ConfigError
from mtlora.tasks import TASKS
from mtlora_base.numbers import is_finite_number

# Swin v1 variants as timm names them; custom sizes are built from the same fields.
SWIN_VARIANTS: dict[str, dict[str, Any]] = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # The test and demo size: the architecture of the official-code fixture.
    "swin_micro": dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4),
}

ADAPTER_KINDS = ("mtlora", "mtlora+", "mtl-lora", "lora", "full", "decoders-only", "single-task")
# How a task layer's shared output relates to its task outputs (the official MTLORA.SHARED_MODE; its
# `lora_only` is our kind "lora"). `addition`: the shared output is W x + b + LayerNorm(sum of task outputs).
SHARED_MODES = ("matrix", "matrixv2", "addition")
# The official MTLORA.BIAS: which biases train besides the adapters (`lora_only` unfreezes the bias of
# LoRA layers that have one of their own; the official LoRA layers keep theirs in `linear`, so it frees none).
BIAS_MODES = ("none", "all", "lora_only")
# The official TRAIN.FREEZE_* flags: backbone parameter groups that MTLoRA training otherwise trains.
FREEZE_GROUPS = ("patch_embed", "norm", "relative_position_bias", "downsample_reduction")
# Decoder heads of the official MODEL.DECODER_HEAD, per task.
DECODER_HEADS = ("hrnet", "segformer", "updecoder", "aspp")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
# The layers of the last block of each stage that carry task-specific adapters (qkv stays shared).
TASK_SPECIFIC_TARGETS = ("proj", "fc1", "fc2")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Far above any Swin that exists, far below sizes that would try to allocate terabytes (a rank of 1e12).
MAX_WIDTH = 65536
MAX_COUNT = 1024


def _number(value: Any, name: str, low: float | None = None, high: float | None = None, *,
            above: bool = False) -> float:
    """A finite number for field `name`, in [low, high] (`above`: greater than `low`); text, a bool,
    NaN or an infinity in a config is damage, not a value to convert."""
    if not is_finite_number(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if above else value < low):
        raise ConfigError(f"{name} must be {'greater than' if above else 'at least'} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be at most {high:g}, got {value!r}")
    return float(value)


def _whole(value: Any, name: str, low: int = 1, high: int = MAX_WIDTH) -> int:
    """A whole number for field `name` in [low, high] (2.0 is 2; 8.5, "24", true and NaN are refused)."""
    number = _number(value, name, low, high)
    if number != int(number):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _sequence(value: Any, name: str) -> list:
    """A list for field `name`: a string is not a list of its characters."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list, got {value!r}")
    return list(value)


def _per_stage(value: Any, num_stages: int, name: str, cast: type) -> tuple:
    """Accept a scalar or a list of one or `num_stages` values, as the official config does."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * num_stages
    if len(values) != num_stages:
        raise ConfigError(f"{name} needs 1 or {num_stages} values (one per stage), got {len(values)}")
    if cast is int:  # the sign is checked where the ranks are resolved, with what a rank must be
        return tuple(_whole(v, name, -MAX_WIDTH) for v in values)
    return tuple(_number(v, name) for v in values)


@dataclass
class SwinConfig:
    """A Swin Transformer v1 backbone (any timm variant or a custom size)."""

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0
    # The official MODEL.SWIN.QK_SCALE (None: head_dim ** -0.5), PATCH_NORM and APE (a learnt absolute
    # position embedding added after the patch embedding).
    qk_scale: float | None = None
    patch_norm: bool = True
    ape: bool = False

    def __post_init__(self) -> None:
        self.depths = tuple(_whole(d, "swin.depths", 1, MAX_COUNT) for d in _sequence(self.depths, "swin.depths"))
        self.num_heads = tuple(_whole(h, "swin.num_heads", 1, MAX_COUNT)
                               for h in _sequence(self.num_heads, "swin.num_heads"))
        self.embed_dim = _whole(self.embed_dim, "swin.embed_dim")
        self.patch_size = _whole(self.patch_size, "swin.patch_size", 1, MAX_COUNT)
        self.window_size = _whole(self.window_size, "swin.window_size", 1, MAX_COUNT)
        self.in_chans = _whole(self.in_chans, "swin.in_chans", 1, MAX_COUNT)
        self.mlp_ratio = _number(self.mlp_ratio, "swin.mlp_ratio", 0, MAX_COUNT, above=True)
        self.drop_path_rate = _number(self.drop_path_rate, "swin.drop_path_rate", 0, 1)
        if len(self.depths) != len(self.num_heads):
            raise ConfigError(f"depths {self.depths} and num_heads {self.num_heads} must have the same length")
        if any(d <= 0 for d in self.depths) or any(h <= 0 for h in self.num_heads):
            raise ConfigError("depths and num_heads must be positive")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ConfigError(f"stage {i}: dim {self.embed_dim * 2**i} is not divisible by {heads} heads")
        if self.patch_size <= 0 or self.window_size <= 0 or self.embed_dim <= 0:
            raise ConfigError("patch_size, window_size and embed_dim must be positive")
        if self.qk_scale is not None:
            self.qk_scale = _number(self.qk_scale, "swin.qk_scale", 0, above=True)
        check_input_size(self, self.img_size)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    def stage_resolution(self, stage: int) -> int:
        """Token grid side length inside stage `stage` (before its patch merging)."""
        return self.img_size // self.patch_size // 2**stage

    def stage_dims(self) -> list[int]:
        """Channels of the per-stage features that feed the decoders (after each stage's patch merging)."""
        last = self.num_stages - 1
        return [self.embed_dim * 2 ** (i + 1 if i < last else i) for i in range(self.num_stages)]

    def feature_resolutions(self) -> list[int]:
        last = self.num_stages - 1
        return [self.stage_resolution(i + 1 if i < last else i) for i in range(self.num_stages)]

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> SwinConfig:
        if name not in SWIN_VARIANTS:
            raise ConfigError(f"unknown Swin variant '{name}'; choose one of {', '.join(SWIN_VARIANTS)}")
        return cls(**{**SWIN_VARIANTS[name], **overrides})


# What building a model may allocate for its shifted-window attention masks before it refuses:
# a config that asks for more is a mistake (or hostile), and would otherwise fail deep inside timm.
MAX_MASK_BYTES = 2 << 30


def attention_mask_bytes(swin: SwinConfig, img_size: int) -> int:
    """Bytes of the float32 shift masks timm builds, (windows, N, N) per shifted block, for `img_size`."""
    total = 0
    for stage, depth in enumerate(swin.depths):
        tokens = img_size // swin.patch_size // 2**stage
        window = min(swin.window_size, tokens)
        if tokens > window:  # a window covering the grid is not shifted
            total += (depth // 2) * tokens**2 * window**2 * 4
    return total


def check_input_size(swin: SwinConfig, img_size: int) -> None:
    """Refuse an input size that does not fit the patch size, merging and window partition, or whose
    attention masks alone would take more memory than any real input needs."""
    stride = swin.patch_size * 2 ** (swin.num_stages - 1)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0:
        raise ConfigError(f"input size {img_size!r} must be a positive whole number of pixels, e.g. {stride * 16}")
    masks = attention_mask_bytes(swin, img_size)
    if masks > MAX_MASK_BYTES:
        raise ConfigError(f"input size {img_size} is far too large: its attention masks alone would take "
                          f"{masks / 2**30:,.0f} GiB (at most {MAX_MASK_BYTES >> 30} GiB); use the size the model "
                          f"was trained at, e.g. {stride * 16}")
    if img_size % stride:
        raise ConfigError(
            f"input size {img_size} does not fit the backbone: it must be a multiple of "
            f"{stride} (patch {swin.patch_size} x 2^{swin.num_stages - 1} merges)"
        )
    for stage in range(swin.num_stages):
        res = img_size // swin.patch_size // 2**stage
        if res > swin.window_size and res % swin.window_size:
            raise ConfigError(
                f"input size {img_size} does not fit the window partition: stage {stage} has a "
                f"{res}x{res} token grid, not a multiple of window {swin.window_size}; use e.g. "
                f"{swin.patch_size * swin.window_size * 2 ** (swin.num_stages - 1)} or a multiple of it"
            )


@dataclass
class AdapterConfig:
    """Which adapters the backbone carries and how they are sized.

    Ranks and scales are per stage (the official code's `R`, `SHARED_SCALE`,
    `R_PER_TASK`, `SCALE_PER_TASK`); a scale is a plain multiplier, not alpha/r.
    """

    kind: str = "mtlora"
    shared_rank: tuple[int, ...] = (16,)
    shared_scale: tuple[float, ...] = (4.0,)
    task_rank: dict[str, tuple[int, ...]] = field(default_factory=dict)
    task_scale: dict[str, tuple[float, ...]] = field(default_factory=dict)
    shared_mode: str = "matrix"
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    # MTL-LoRA (Yang et al. 2024): number of up-projections and the softmax temperature.
    mtl_num_up: int = 3
    mtl_temperature: float = 0.5
    # The official MTLORA.TRAINABLE_SCALE_SHARED: every LoRA layer learns its shared scale.
    shared_scale_trainable: bool = False
    # The official MTLORA.INTERMEDIATE_SPECIALIZATION: task adapters in every block, not only the last of a stage.
    intermediate_specialization: bool = False
    # What trains besides the adapters (official MTLORA.BIAS, TRAIN.FREEZE_*, MTLORA.FREEZE_PRETRAINED).
    bias: str = "none"
    freeze: tuple[str, ...] = ()
    freeze_pretrained: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ADAPTER_KINDS:
            raise ConfigError(f"unknown adapter kind '{self.kind}'; choose one of {', '.join(ADAPTER_KINDS)}")
        if self.shared_mode not in SHARED_MODES:
            raise ConfigError(f"unknown shared mode '{self.shared_mode}'; choose one of {', '.join(SHARED_MODES)}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"unknown LoRA target(s) {bad}; supported: {', '.join(LORA_TARGETS)}")
        self.dropout = _number(self.dropout, "adapter.dropout", 0, 1)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        self.mtl_num_up = _whole(self.mtl_num_up, "adapter.mtl_num_up", 1, MAX_COUNT)
        self.mtl_temperature = _number(self.mtl_temperature, "adapter.mtl_temperature", 0, above=True)
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"unknown bias mode '{self.bias}'; choose one of {', '.join(BIAS_MODES)}")
        self.freeze = tuple(self.freeze)
        bad = [g for g in self.freeze if g not in FREEZE_GROUPS]
        if bad:
            raise ConfigError(f"unknown freeze group(s) {bad}; choose from {', '.join(FREEZE_GROUPS)}")
        self.freeze = tuple(g for g in FREEZE_GROUPS if g in self.freeze)
        independent_tasks = self.kind in ("mtlora", "mtlora+")
        if self.shared_mode == "addition" and not independent_tasks:
            raise ConfigError(f"shared mode 'addition' needs task adapters of kind mtlora or mtlora+, not '{self.kind}'")
        if self.intermediate_specialization and not independent_tasks:
            raise ConfigError(f"intermediate specialization needs task adapters of kind mtlora or mtlora+, not '{self.kind}'")

    @property
    def has_adapters(self) -> bool:
        return self.kind in ("mtlora", "mtlora+", "mtl-lora", "lora")

    @property
    def has_task_streams(self) -> bool:
        return self.kind in ("mtlora", "mtlora+", "mtl-lora")

    @property
    def patch_merging_lora(self) -> bool:
        return self.kind == "mtlora+"

    @property
    def task_adapter(self) -> str:
        return "mtl-lora" if self.kind == "mtl-lora" else "lora"

    def has_task_adapters(self, block: int, depth: int) -> bool:
        """Whether block `block` of a stage with `depth` blocks carries task adapters."""
        return self.has_task_streams and (self.intermediate_specialization or block == depth - 1)

    def resolve(self, num_stages: int, tasks: tuple[str, ...]) -> None:
        """Expand scalars to per-stage tuples and fill per-task values from the shared ones."""
        self.shared_rank = _per_stage(self.shared_rank, num_stages, "shared_rank", int)
        self.shared_scale = _per_stage(self.shared_scale, num_stages, "shared_scale", float)
        unknown = sorted(set(self.task_rank) - set(tasks)) + sorted(set(self.task_scale) - set(tasks))
        if unknown:
            raise ConfigError(f"adapter settings name task(s) {sorted(set(unknown))} that the model does not have")
        self.task_rank = {
            t: _per_stage(self.task_rank.get(t, self.shared_rank), num_stages, f"task_rank[{t}]", int) for t in tasks
        }
        self.task_scale = {
            t: _per_stage(self.task_scale.get(t, self.shared_scale), num_stages, f"task_scale[{t}]", float)
            for t in tasks
        }
        if self.has_adapters:
            ranks = list(self.shared_rank) + [r for t in tasks for r in self.task_rank[t]]
            if any(r <= 0 for r in ranks):
                raise ConfigError(f"LoRA ranks must be positive integers, got {ranks}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a multi-task model from its weights."""

    swin: SwinConfig = field(default_factory=SwinConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    tasks: tuple[str, ...] = ("semseg", "human_parts", "sal", "normals")
    task_channels: dict[str, int] = field(default_factory=dict)
    decoder_channels: tuple[int, ...] = (18, 36, 72, 144)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # task -> decoder head other than HRNet (the official MODEL.DECODER_HEAD); SegFormer's embedding width.
    decoder_heads: dict[str, str] = field(default_factory=dict)
    segformer_channels: int = 256
    # The official MODEL.DECODER_DOWNSAMPLER (1x1 convs to `decoder_channels`; off: decoders read the
    # backbone's channels) and MODEL.PER_TASK_DOWNSAMPLER (off: one downsampler for all tasks).
    decoder_downsampler: bool = True
    per_task_downsampler: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.swin, dict):
            self.swin = SwinConfig(**self.swin)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        self.tasks = tuple(_sequence(self.tasks, "tasks"))
        if not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks must be task names, got {list(self.tasks)!r}")
        if not self.tasks:
            raise ConfigError("a model needs at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"duplicate task names in {list(self.tasks)}")
        if "shared" in self.tasks:
            raise ConfigError("'shared' is reserved for the task-agnostic adapters; rename the task")
        if not isinstance(self.task_channels, dict):
            raise ConfigError(f"task_channels must map tasks to channels, got {self.task_channels!r}")
        channels = {t: _whole(c, f"task_channels.{t}") for t, c in self.task_channels.items()}
        for task in self.tasks:
            if task not in channels:
                if task not in TASKS:
                    raise ConfigError(
                        f"unknown task '{task}'; known tasks: {', '.join(TASKS)} "
                        "(or give its output channels explicitly)"
                    )
                # the benchmark's channels; a data set may override the classes (NYUD semseg has 40)
                channels[task] = TASKS[task].channels
        if any(c <= 0 for c in channels.values()):
            raise ConfigError(f"task output channels must be positive, got {channels}")
        self.task_channels = {t: channels[t] for t in self.tasks}
        self.decoder_channels = tuple(_whole(c, "decoder_channels")
                                      for c in _sequence(self.decoder_channels, "decoder_channels"))
        for name, low in (("mean", None), ("std", 0)):
            values = _sequence(getattr(self, name), name)
            if len(values) != 3:
                raise ConfigError(f"{name} needs 3 values (one per RGB channel), got {values!r}")
            setattr(self, name, tuple(_number(v, name, low, above=low is not None) for v in values))
        if len(self.decoder_channels) != self.swin.num_stages:
            raise ConfigError(
                f"decoder_channels needs one value per stage ({self.swin.num_stages}), got {len(self.decoder_channels)}"
            )
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        heads = dict(self.decoder_heads)
        unknown = sorted(set(heads) - set(self.tasks))
        if unknown:
            raise ConfigError(f"decoder_heads names task(s) {unknown} that the model does not have")
        bad = {t: h for t, h in heads.items() if h not in DECODER_HEADS}
        if bad:
            raise ConfigError(f"unknown decoder head(s) {bad}; choose from {', '.join(DECODER_HEADS)}")
        # HRNet is the default head, so only the other heads are kept (in task order).
        self.decoder_heads = {t: heads[t] for t in self.tasks if heads.get(t, "hrnet") != "hrnet"}
        self.segformer_channels = int(self.segformer_channels)
        if self.segformer_channels <= 0:
            raise ConfigError(f"segformer_channels must be positive, got {self.segformer_channels}")
        if self.adapter.kind == "single-task" and len(self.tasks) != 1:
            raise ConfigError(f"a single-task model has exactly one task, got {list(self.tasks)}")
        self.adapter.resolve(self.swin.num_stages, self.tasks)

    def decoder_head(self, task: str) -> str:
        return self.decoder_heads.get(task, "hrnet")

    def decoder_input_channels(self) -> list[int]:
        """Channels of the per-stage maps the decoders read: `decoder_channels`, or the backbone's without downsampler."""
        return list(self.decoder_channels) if self.decoder_downsampler else self.swin.stage_dims()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # Options added after the first release are written only when set, so a config without them
        # (and every export's metadata) reads exactly as before.
        for section, defaults in (("swin", _SWIN_OPTIONAL), ("adapter", _ADAPTER_OPTIONAL), (None, _MODEL_OPTIONAL)):
            fields_ = data[section] if section else data
            for name, default in defaults.items():
                if fields_[name] == default:
                    del fields_[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError("model config must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s): {', '.join(unknown)}")
        _require_fields(data, cls, _MODEL_OPTIONAL, "")
        for section, section_cls, optional in (("swin", SwinConfig, _SWIN_OPTIONAL),
                                               ("adapter", AdapterConfig, _ADAPTER_OPTIONAL)):
            if isinstance(data[section], dict):
                _require_fields(data[section], section_cls, optional, f"{section}.")
        data = dict(data)
        try:
            if isinstance(data.get("swin"), dict):
                data["swin"] = SwinConfig(**data["swin"])
            if isinstance(data.get("adapter"), dict):
                data["adapter"] = AdapterConfig(**data["adapter"])
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"invalid model config: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise ConfigError(f"model config is not valid JSON: {err}") from None


def _require_fields(data: dict[str, Any], cls: type, optional: dict[str, Any], prefix: str) -> None:
    """Every field a saved config always holds is there: one left out would take its default silently
    (ImageNet mean and std, the default tasks) and the model would not be the one trained."""
    missing = [f.name for f in fields(cls) if f.name not in optional and f.name not in data]
    if missing:
        raise ConfigError(f"model config lacks {', '.join(prefix + name for name in missing)}: a config written "
                          "by mtlora has every field; restore the file, or save the checkpoint again")


def _defaults(cls: type, names: tuple[str, ...]) -> dict[str, Any]:
    """{field: its dataclass default} for `names` of `cls` (read from the fields, so they cannot drift)."""
    by_name = {f.name: f for f in fields(cls)}
    return {n: by_name[n].default_factory() if by_name[n].default is MISSING else by_name[n].default for n in names}


# Later fields and their defaults; `ModelConfig.to_dict` leaves them out at these values.
_SWIN_OPTIONAL = _defaults(SwinConfig, ("qk_scale", "patch_norm", "ape"))
_ADAPTER_OPTIONAL = _defaults(AdapterConfig, ("shared_scale_trainable", "intermediate_specialization", "bias",
                                              "freeze", "freeze_pretrained"))
_MODEL_OPTIONAL = _defaults(ModelConfig, ("decoder_heads", "segformer_channels", "decoder_downsampler",
                                          "per_task_downsampler"))
