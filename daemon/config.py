"""Strict configuration: YAML file + ``POLECHECK_*`` environment overrides -> validated model.

Unknown keys, bad values and duplicate YAML keys fail at start-up with the key's path, e.g.
``ingest.max_frame_bytes: Input should be greater than 0``.

Environment overrides: ``POLECHECK_<SECTION>__<KEY>[__<SUBKEY>...]=<YAML scalar>``, e.g.
``POLECHECK_INGEST__ENDPOINT=connect:tcp://10.0.0.5:5555``.  Every ``POLECHECK_*`` variable
except those in ``RESERVED_ENV`` must name a config key, so a typo is an error, not a no-op.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Mapping

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "POLECHECK_"
RESERVED_ENV = {"POLECHECK_CONFIG"}  # path of the config file, not an override
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "default.yaml"


class ConfigError(ValueError):
    """Invalid configuration; ``problems`` is a list of ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        super().__init__(f"invalid {source}:\n{lines}")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _endpoint(v: str) -> str:
    how, sep, addr = v.partition(":")
    if not sep or how not in ("bind", "connect") or "://" not in addr:
        raise ValueError("must be 'bind:<transport>://<addr>' or 'connect:<transport>://<addr>'")
    return v


#: a ZeroMQ endpoint that says what to do with it: ``bind:tcp://...`` or ``connect:tcp://...``
Endpoint = Annotated[str, AfterValidator(_endpoint)]


class IngestConfig(Strict):
    """Where frames come from and what a frame may be."""

    endpoint: Endpoint = Field("connect:tcp://127.0.0.1:5555", description="camera feed endpoint (bind:/connect:)")
    socket: Literal["pull", "sub"] = Field("pull", description="pull: lossless back-pressure; sub: fan-out, drops at HWM")
    hwm: int = Field(64, ge=1, le=100_000, description="ZeroMQ high-water mark in messages")
    max_frame_bytes: int = Field(64 * 1024 * 1024, gt=0, le=2**31, description="largest pixel buffer accepted")
    max_side: int = Field(8192, ge=16, le=65536, description="largest image side accepted")
    max_header_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024, description="largest header accepted")


class RoiConfig(Strict):
    """Stage 1 (roi_corners): oFAST corners, ROI, tip direction, corner set Q."""

    n_corners: int = Field(512, ge=64, le=1024, description="N: size of the corner set Q for the fusion")
    coarse_side: int = Field(512, ge=256, le=2048, description="longest side of the coarse detection image")
    margin_behind_px: float = Field(16.0, ge=0, le=256, description="added behind the band (the stack body's end)")
    margin_ahead_px: float = Field(24.0, ge=0, le=256, description="added past the band's end, ahead of the tips")
    margin_across_px: float = Field(12.0, ge=0, le=256, description="added to both of the stack's outer edges")
    fast_threshold: int = Field(10, ge=1, le=100, description="FAST threshold on the 8-bit window (coarse)")
    fast_threshold_full: int = Field(12, ge=1, le=100, description="FAST threshold at full resolution (Q)")
    low_percentile: float = Field(0.5, ge=0, lt=50, description="robust window: dark end")
    high_percentile: float = Field(99.5, gt=50, le=100, description="robust window: bright end")

    def params(self):
        from .roi import RoiParams

        return RoiParams(n_corners=self.n_corners, coarse_side=self.coarse_side,
                         margin_behind_px=self.margin_behind_px,
                         margin_ahead_px=self.margin_ahead_px, margin_across_px=self.margin_across_px,
                         fast_threshold=self.fast_threshold, fast_threshold_full=self.fast_threshold_full,
                         percentiles=(self.low_percentile, self.high_percentile))


PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ModelConfig(Strict):
    """Stage 2 (keypoint_model): the ONNX HRNet and how to run it."""

    path: str = Field("models/hrnet_tips.onnx", min_length=1,
                      description="ONNX model; a relative path is relative to the polecheck checkout")
    sha256: str | None = Field("92d1d28b86fb734bfff8c56ae0ae8717c508056f07829beb49fdff317bd0fae8", pattern=r"^[0-9a-f]{64}$",
                               description="pinned SHA-256 of the model file (null: not checked)")
    providers: tuple[Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], ...] = Field(
        ("CUDAExecutionProvider", "CPUExecutionProvider"), min_length=1,
        description="ONNX Runtime providers in order of preference; unavailable ones are skipped")
    threads: int = Field(1, ge=0, le=256, description="intra-op threads per inference on CPU (0 = ONNX Runtime "
                                                      "default); the daemon runs pipeline.model_workers in parallel")
    threshold: float = Field(0.6, gt=0, lt=1, description="smallest heatmap peak that is a tip")
    low_threshold: float = Field(0.3, gt=0, lt=1,
                                 description="weaker peaks down to this are tips where they continue the staircase")
    tile_overlap_px: float = Field(48.0, ge=16, le=512, description="overlap of the crops where one ROI needs several")
    max_crop_px: tuple[int, int] | None = Field(  # the default is codec.MAX_CROP (a test checks)
        (512, 1024), description="(w, h) along/across the layers: crops fitted to the ROI up to this size "
                                 "(a model with a dynamic input size; null: fixed tiles of the model's input size)")
    crop_context_px: float = Field(8.0, ge=0, le=128, description="image px of context around the ROI in its crop")
    min_distance_px: float = Field(12.0, ge=0, le=64,
                                   description="NMS: of two same-class tips closer than this only the stronger stays")
    max_batch: int = Field(8, ge=1, le=256, description="B: crops per model call (micro-batch)")
    fp16: bool = Field(True, description="FP16 where the provider supports it (TensorRT); CUDA/CPU run FP32")
    io_binding: bool = Field(True, description="bind inputs/outputs once per batch (device-side output on CUDA)")
    fixed_shape: Literal["auto"] | bool = Field(
        "auto", description="one input shape for every model call: fixed tiles of the model's input size, "
        "batches padded to max_batch (true/false, or auto: on for CUDA, whose every change of input shape "
        "costs 50-500 ms, measured on an H200; off for CPU, whose time is linear in pixels, and TensorRT, "
        "whose profile covers the sizes)")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE", description="CUDA: how cuDNN picks each convolution's algorithm for an input shape. "
        "EXHAUSTIVE times them all (once, at warm-up, with fixed_shape); it was the fastest on an H200")
    warmup_runs: int = Field(2, ge=0, le=100, description="model calls at start-up before READY")

    @field_validator("fixed_shape", mode="before")
    @classmethod
    def _fixed_shape(cls, v):  # YAML reads true/false/on/off as booleans, the environment as strings
        words = {"auto": "auto", "true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in words:
            return words[v.strip().lower()]
        raise ValueError(f"must be auto, true or false, got {v!r}")

    @model_validator(mode="after")
    def _thresholds(self):
        if self.low_threshold > self.threshold:
            raise ValueError("model.low_threshold must be <= model.threshold")
        if self.max_crop_px is not None and not all(64 <= v <= 4096 for v in self.max_crop_px):
            raise ValueError("model.max_crop_px must be two sizes in [64, 4096] (or null)")
        if self.max_crop_px is not None and min(self.max_crop_px) <= self.tile_overlap_px:
            raise ValueError("model.max_crop_px must be larger than model.tile_overlap_px")
        return self

    def resolved_path(self) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else REPO_ROOT / p


class FusionConfig(Strict):
    """Stage 3 (refine): corner-prior fusion of the model's tips with the corner set Q."""

    enabled: bool = Field(False, description="off by default: on phantoms it helps normal frames a little and "
                                             "hurts hard ones (docs/accuracy.md, ablation)")
    radius_strides: float = Field(1.5, gt=0, le=8, description="support radius in heatmap strides")
    sigma_tip: float = Field(0.25, gt=0, le=10, description="px, a tip's scatter at heatmap score 1")
    sigma_corner: float = Field(1.0, gt=0, le=10, description="px, a corner's scatter around its tip")
    unsupported_factor: float = Field(0.9, gt=0, le=1, description="score multiplier for a tip without corners")
    bias_correction: bool = Field(False, description="shift corners by the frame's median along-axis offset")

    def params(self):
        """``FusionParams`` when enabled, else None."""
        from .fusion import FusionParams

        if not self.enabled:
            return None
        return FusionParams(radius_strides=self.radius_strides, sigma_tip=self.sigma_tip,
                            sigma_corner=self.sigma_corner, unsupported_factor=self.unsupported_factor,
                            bias_correction=self.bias_correction)


class RecipeConfig(Strict):
    """Acceptance rules for one cell type."""

    name: str = Field("default", min_length=1, description="recipe name, reported with each verdict")
    overhang_min_um: float = Field(750.0, ge=-5000, le=20000, description="smallest accepted overhang")
    overhang_max_um: float = Field(2250.0, ge=-5000, le=20000, description="largest accepted overhang")
    expected_layers: int | None = Field(None, ge=3, le=1001, description="anodes + cathodes, if fixed")
    min_confidence: float = Field(0.3, ge=0.0, le=1.0,
                                  description="a tip scored below this makes the frame NG low_confidence")
    max_layer_gap: float = Field(1.6, gt=1.0, le=10.0,
                                 description="same-class tips further apart than this x their median step: "
                                             "NG layer_gap (a layer not found)")

    @model_validator(mode="after")
    def _order(self):
        if not self.overhang_min_um < self.overhang_max_um:
            raise ValueError("overhang_min_um must be < overhang_max_um")
        if self.expected_layers is not None and self.expected_layers % 2 == 0:
            raise ValueError("expected_layers must be odd (anodes = cathodes + 1)")
        return self


class FeedConfig(Strict):
    """The built-in synthetic scanner (`polecheck feed`, the demo)."""

    endpoint: Endpoint = Field("bind:tcp://127.0.0.1:5555", description="where the feed publishes")
    socket: Literal["push", "pub"] = Field("push", description="push pairs with ingest.socket=pull")
    scanner_id: str = Field("xray-sim-01", min_length=1, max_length=128)
    preset: Literal["normal", "hard", "defects"] = "normal"
    size: tuple[int, int] = Field((1024, 1024), description="frame size (w, h)")
    bits: Literal[8, 16] = 16
    rate_hz: float = Field(20.0, ge=0, le=10000, description="frames per second; 0 = as fast as possible")
    pool_cells: int = Field(8, ge=1, le=4096, description="cells pre-rendered and cycled")
    seed: int = Field(0, ge=0)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if not all(128 <= s <= 8192 for s in v):
            raise ValueError("each side must be in 128..8192")
        return v


class PipelineConfig(Strict):
    """How the App runs the stages (docs/design.md, "Daemon")."""

    executor: Literal["thread", "process"] = Field(
        "thread", description="roi_corners workers: threads (OpenCV releases the GIL) or processes")
    roi_workers: int = Field(1, ge=1, le=64, description="parallel roi_corners workers (one keeps up with 50 "
                                                         "frames/s on 2 cores and contends less than two)")
    model_workers: int = Field(2, ge=1, le=16,
                               description="keypoint_model threads sharing the session (with model.threads 1: "
                                           "parallel single-threaded inferences)")
    refine_workers: int = Field(1, ge=1, le=64, description="parallel refine + verdict_rules workers")
    opencv_threads: int = Field(
        1, ge=0, le=256,
        description="OpenCV's worker threads in the daemon (and in roi_corners processes); 0 = OpenCV's default, "
                    "one per core. The App already runs stages and frames side by side; OpenCV's own pool on top "
                    "spins on every small call (docs/benchmarks.md)")
    malloc_tuning: bool = Field(
        True, description="glibc: serve blocks under 32 MiB from the heap and keep its free top (up to 1 GiB), so "
                          "each frame's arrays do not fault in fresh pages (docs/benchmarks.md); the process keeps "
                          "its high-water memory. No effect with other C libraries")
    queue_size: int = Field(8, ge=1, le=4096, description="frames each bounded queue between stages holds")
    batch_wait_ms: float = Field(4.0, ge=0, le=1000,
                                 description="T: the model waits this long for more crops (B = model.max_batch)")
    admit_timeout_ms: float = Field(50.0, ge=0, le=60_000,
                                    description="a frame that finds the first queue full this long is NG overload")
    deadline_ms: float = Field(2000.0, gt=0, le=600_000,
                               description="a frame not through the model this long after arrival is NG overload")
    max_gap_verdicts: int = Field(10_000, ge=1, le=10_000_000,
                                  description="missing_frame verdicts emitted one per seq up to this many per gap")


class CellsConfig(Strict):
    """Cell aggregation: the corners of one cell_id into one cell verdict."""

    corners: int = Field(4, ge=1, le=16, description="corners per cell")
    timeout_ms: float = Field(10_000.0, gt=0, le=3_600_000,
                              description="a cell whose corners do not all arrive within this is NG incomplete")
    max_open: int = Field(4096, ge=1, le=1_000_000,
                          description="open cells held at most; the oldest is closed NG incomplete beyond")


class OutputConfig(Strict):
    """Where verdicts go (JSON on a ZeroMQ PUB socket, docs/protocol.md)."""

    endpoint: Endpoint = Field("bind:tcp://127.0.0.1:5556", description="verdict PUB socket")
    hwm: int = Field(100_000, ge=1, le=10_000_000, description="verdicts queued per subscriber")
    status_interval_s: float = Field(1.0, gt=0, le=3600,
                                     description="a status message (counts, in flight) on the PUB socket this often")


class JournalConfig(Strict):
    """Append-only verdict journal (JSON lines), written before a verdict is published."""

    enabled: bool = True
    fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="always: fsync each verdict; interval: at most every fsync_interval_ms; never: OS")
    fsync_interval_ms: float = Field(200.0, ge=1, le=60_000)
    max_file_mb: float = Field(256.0, gt=0, le=65536, description="a journal file is rotated at this size")
    keep_files: int = Field(32, ge=1, le=100_000, description="rotated journal files kept")


class ArchiveConfig(Strict):
    """NG archive: the raw frame (16-bit PNG) and an overlay PNG of every NG frame, within a budget."""

    enabled: bool = True
    budget_mb: float = Field(2048.0, gt=0, le=10_000_000, description="oldest entries are deleted beyond this")
    queue_size: int = Field(16, ge=1, le=4096,
                            description="frames waiting to be written; beyond it archiving is skipped (counted)")


class MetricsConfig(Strict):
    """Prometheus exporter."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1, description="listen address (loopback by default)")
    port: int = Field(9108, ge=0, le=65535, description="0: any free port")


class ServiceConfig(Strict):
    """systemd integration and state."""

    state_dir: str | None = Field(None, description="journal and NG archive; null: $STATE_DIRECTORY, else ./var")
    drain_s: float = Field(10.0, ge=0, le=600, description="SIGTERM: time to finish the frames in flight")
    status_interval_s: float = Field(5.0, gt=0, le=3600, description="STATUS= line to systemd every this often")


class LogConfig(Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Config(Strict):
    ingest: IngestConfig = IngestConfig()
    roi: RoiConfig = RoiConfig()
    model: ModelConfig = ModelConfig()
    fusion: FusionConfig = FusionConfig()
    recipe: RecipeConfig = RecipeConfig()
    pipeline: PipelineConfig = PipelineConfig()
    cells: CellsConfig = CellsConfig()
    output: OutputConfig = OutputConfig()
    journal: JournalConfig = JournalConfig()
    archive: ArchiveConfig = ArchiveConfig()
    metrics: MetricsConfig = MetricsConfig()
    service: ServiceConfig = ServiceConfig()
    feed: FeedConfig = FeedConfig()
    log: LogConfig = LogConfig()


# --------------------------------------------------------------------------- loading
def _duplicates(node: yaml.Node, path: str = "") -> list[tuple[str, str]]:
    """Duplicate mapping keys anywhere in a composed YAML tree (PyYAML keeps the last)."""
    out = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in seen:
                out.append((sub, f"duplicate key (line {line}, first at line {seen[key]})"))
            seen.setdefault(key, line)
            out += _duplicates(value_node, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicates(item, f"{path}[{i}]")
    return out


def parse_yaml(text: str) -> dict:
    """Safe-load YAML, rejecting duplicate keys with their paths."""
    dups = _duplicates(yaml.compose(text, Loader=yaml.SafeLoader))
    if dups:
        raise ConfigError(dups)
    data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([("<root>", f"must be a mapping, got {type(data).__name__}")])
    return data


def env_overrides(environ: Mapping[str, str]) -> dict:
    """Nested dict from ``POLECHECK_A__B=value`` variables (values parsed as YAML scalars)."""
    out: dict = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in path):
            raise ConfigError([(name, "malformed override name (use POLECHECK_SECTION__KEY)")], "environment")
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([(name, "conflicts with another override")], "environment")
        try:
            node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError([(name, f"not a YAML value: {raw!r:.60}")], "environment") from None
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    return [(".".join(str(p) for p in e["loc"]) or "<root>", e["msg"]) for e in err.errors()]


def load_config(path: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (default: $POLECHECK_CONFIG or config/default.yaml), apply the
    environment overrides and validate.  Raises ``ConfigError`` naming every bad key."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("POLECHECK_CONFIG") or DEFAULT_CONFIG)
    if path == DEFAULT_CONFIG and not path.exists():
        text = ""  # installed without the repo's config/: the model defaults are the default
    else:
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError([("<file>", f"cannot read {path}: {e.strerror or e}")], str(path)) from None
    try:
        data = _merge(parse_yaml(text), env_overrides(environ))
    except yaml.YAMLError as e:
        raise ConfigError([("<yaml>", str(e).replace("\n", " "))], str(path)) from None
    except ConfigError as e:
        raise ConfigError(e.problems, str(path)) from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_problems(e), str(path)) from None


def dump_config(cfg: Config) -> str:
    """The effective configuration as YAML (defaults included)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
