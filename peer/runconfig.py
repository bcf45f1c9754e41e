"""The run config (run.toml): parsed, validated and hashed the same way by coordinator and peer.

The coordinator reads it from disk and sends its text to every peer at join; both sides parse it
with :func:`parse_run_config`, so a peer trains on exactly what the operator wrote.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from peer.errors import UserError


STRATEGIES = ("sync", "diloco")
COMPRESSIONS = ("none", "fp16", "uint8", "sparse")
SPARSE_BITS = (2, 4, 8)  # peer.sparse_codec.BITS (kept import-free here)
INNER_STATES = ("reset", "keep")
AGGREGATORS = ("centered_clip", "trimmed_mean", "mean")  # peer.robust.AGGREGATORS (kept import-free here)


@dataclass(frozen=True)
class AveragingConfig:
    """How peers combine their work (``[averaging]``); the defaults keep plain synchronous averaging.

    - ``sync``: hivemind averages gradients every ``target_batch_size`` samples (and parameters right after).
    - ``diloco``: each peer takes ``inner_steps`` local optimizer steps, then the swarm all-reduces the
      pseudo-gradient (parameters before minus after) and applies an outer Nesterov SGD step.
    ``compression`` is the codec of every averaged tensor on the wire. ``sparse`` (diloco only,
    peer.sparse_codec) sends the ``sparse_density`` x ``sparse_chunk`` largest values of each chunk of
    ``sparse_chunk`` values as ``sparse_bits``-bit integers, and each peer keeps what it did not send
    for its next round (error feedback).
    ``aggregator`` is how each all-reduce part is combined (peer.robust): ``centered_clip`` (default,
    robust, clip radius ``tau`` times the group's median distance to its coordinate-wise median),
    ``trimmed_mean`` or ``mean`` (hivemind's weighted mean, no defence against a poisoning peer).
    """

    strategy: str = "sync"
    compression: str = "none"
    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    overlap: bool = False
    # diloco: "reset" gives each phase a fresh inner optimizer, so the auditor can replay it from the
    # anchor (peer/strategies/diloco.py); "keep" carries its state across phases (better loss, only
    # each phase's first step can be replayed)
    inner_state: str = "reset"
    aggregator: str = "centered_clip"
    tau: float = 2.0
    sparse_density: float = 1 / 32
    sparse_bits: int = 4
    sparse_chunk: int = 256

    @property
    def rule(self):
        """The AveragingRule every averager of this run applies (peer.robust)."""
        from peer.robust import AveragingRule

        return AveragingRule(self.aggregator, self.tau)


@dataclass(frozen=True)
class RunConfig:
    run_id: str
    seed: int
    epochs: int
    task_name: str
    task_version: str
    target_batch_size: int
    micro_batch_size: int
    min_peers: int
    matchmaking_time: float
    averaging_timeout: float
    heartbeat_interval: float
    peer_timeout: float
    access_token_ttl: float
    text: str
    checkpoint_every: int = 10
    checkpoint_keep: int = 3
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    verification: "VerificationConfig" = field(default_factory=lambda: VerificationConfig())

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class VerificationConfig:
    """[verification]: how reports are sketched and audited (see coordinator/books/credit.py, coordinator/auditor.py)."""

    sketch_dims: int = 64               # length of every gradient / parameter sketch
    fp32_tolerance: float = 1e-3        # relative L2 error (and norm ratio - 1) a fp32 replay may show
    bf16_tolerance: float = 0.15        # the same under bf16 autocast (CPU bf16 vs fp32 replay: up to 7.4e-2 seen)
    cheat_fraction: float = 0.1         # a window settles once a peer faking this share of it would be caught
    detection_confidence: float = 0.99  # ... with at least this probability (coordinator/confidence.py)
    audit_rate_new: float = 0.1         # new peers: at least this share replayed as reports arrive (early catch)
    audit_rate: float = 0.025           # established peers: at least this share replayed as reports arrive
    audit_floor: int = 4                # audits per peer per window at least, whatever the confidence rule asks
    established_after: int = 20         # passed audits before a peer counts as established
    snapshot_rate: float = 1.0          # fraction of epochs whose parameters the auditor keeps (< 1: the others'
                                        # reports cannot be verified, so they never settle)
    window_epochs: int = 10             # credit settles per window of this many epochs
    ban_after_strikes: int = 1          # strikes (two independent failed audits each) before a ban
    epoch_slack: int = 3                # epochs a peer may be ahead of the run before its progress is a lie


# section -> field -> (type, default); None as default means required
_SCHEMA: dict[str, dict[str, tuple[type, object]]] = {
    "run": {"id": (str, None), "seed": (int, None), "epochs": (int, 0)},
    "task": {"name": (str, None), "version": (str, None)},
    "training": {
        "target_batch_size": (int, None),
        "micro_batch_size": (int, None),
        "min_peers": (int, 1),
        "matchmaking_time": (float, 2.0),
        "averaging_timeout": (float, 20.0),
    },
    "coordinator": {"heartbeat_interval": (float, 2.0), "peer_timeout": (float, 10.0)},
    "checkpoints": {"every": (int, 10), "keep": (int, 3)},
    "averaging": {
        "strategy": (str, AveragingConfig.strategy),
        "compression": (str, AveragingConfig.compression),
        "inner_steps": (int, AveragingConfig.inner_steps),
        "outer_lr": (float, AveragingConfig.outer_lr),
        "outer_momentum": (float, AveragingConfig.outer_momentum),
        "overlap": (bool, AveragingConfig.overlap),
        "inner_state": (str, AveragingConfig.inner_state),
        "aggregator": (str, AveragingConfig.aggregator),
        "tau": (float, AveragingConfig.tau),
        "sparse_density": (float, AveragingConfig.sparse_density),
        "sparse_bits": (int, AveragingConfig.sparse_bits),
        "sparse_chunk": (int, AveragingConfig.sparse_chunk),
    },
    # 2 h: the swarm keeps averaging through a coordinator outage of at least half of it (tokens are
    # renewed at half-life); evictions do not wait for expiry, they go through the deny list
    "security": {"access_token_ttl": (float, 7200.0)},
    "verification": {f.name: (type(f.default), f.default) for f in fields(VerificationConfig)},
}


def _field(doc: dict, section: str, key: str, kind: type, default: object, where: str):
    value = doc.get(section, {}).get(key, default)
    if value is None:
        raise UserError(f"{where}: missing [{section}] {key}; add it (see examples/digits/run.toml)")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"{where}: [{section}] {key} must be a {kind.__name__}, got {value!r}")
    return value


def parse_run_config(text: str, where: str = "run config") -> RunConfig:
    """Parse and validate run.toml text; raise UserError naming the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{where} is not valid TOML: {error}") from None
    for section, value in doc.items():
        if section not in _SCHEMA or not isinstance(value, dict):
            raise UserError(f"{where}: unknown section [{section}]; allowed: {', '.join(_SCHEMA)}")
        unknown = set(value) - set(_SCHEMA[section])
        if unknown:
            raise UserError(f"{where}: unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")
    values = {
        f"{section}.{key}": _field(doc, section, key, kind, default, where)
        for section, fields in _SCHEMA.items()
        for key, (kind, default) in fields.items()
    }
    config = RunConfig(
        run_id=values["run.id"],
        seed=values["run.seed"],
        epochs=values["run.epochs"],
        task_name=values["task.name"],
        task_version=values["task.version"],
        target_batch_size=values["training.target_batch_size"],
        micro_batch_size=values["training.micro_batch_size"],
        min_peers=values["training.min_peers"],
        matchmaking_time=values["training.matchmaking_time"],
        averaging_timeout=values["training.averaging_timeout"],
        heartbeat_interval=values["coordinator.heartbeat_interval"],
        peer_timeout=values["coordinator.peer_timeout"],
        access_token_ttl=values["security.access_token_ttl"],
        text=text,
        checkpoint_every=values["checkpoints.every"],
        checkpoint_keep=values["checkpoints.keep"],
        averaging=AveragingConfig(**{key: values[f"averaging.{key}"] for key in _SCHEMA["averaging"]}),
        verification=VerificationConfig(**{f.name: values[f"verification.{f.name}"] for f in fields(VerificationConfig)}),
    )
    _check_ranges(config, where)
    return config


def _check_ranges(config: RunConfig, where: str) -> None:
    if not config.run_id or not config.run_id.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"{where}: [run] id must be letters, digits, '-' or '_', got {config.run_id!r}")
    if not all(part.isidentifier() for part in config.task_name.split(".")):
        raise UserError(f"{where}: [task] name must be a Python module path like 'examples.digits', "
                        f"got {config.task_name!r}")
    if config.epochs < 0:
        raise UserError(f"{where}: [run] epochs must be >= 0 (0 means no end), got {config.epochs}")
    if config.micro_batch_size <= 0 or config.target_batch_size < config.micro_batch_size:
        raise UserError(
            f"{where}: need 0 < micro_batch_size <= target_batch_size, "
            f"got {config.micro_batch_size} and {config.target_batch_size}"
        )
    if config.min_peers < 1:
        raise UserError(f"{where}: [training] min_peers must be >= 1, got {config.min_peers}")
    v = config.verification
    if v.sketch_dims not in (8, 16, 32, 64, 128, 256, 512, 1024):
        raise UserError(f"{where}: [verification] sketch_dims must be a power of two from 8 to 1024, "
                        f"got {v.sketch_dims}")
    for name in ("audit_rate_new", "audit_rate", "snapshot_rate"):
        if not 0 < getattr(v, name) <= 1:
            raise UserError(f"{where}: [verification] {name} must be in (0, 1], got {getattr(v, name)}")
    for name in ("cheat_fraction", "detection_confidence"):
        if not 0 < getattr(v, name) < 1:
            raise UserError(f"{where}: [verification] {name} must be in (0, 1), got {getattr(v, name)}")
    for name in ("fp32_tolerance", "bf16_tolerance", "window_epochs", "ban_after_strikes", "epoch_slack"):
        if getattr(v, name) <= 0:
            raise UserError(f"{where}: [verification] {name} must be > 0, got {getattr(v, name)}")
    if config.checkpoint_every < 0 or config.checkpoint_keep < 1:
        raise UserError(f"{where}: [checkpoints] needs every >= 0 (0: no checkpoints) and keep >= 1, "
                        f"got every={config.checkpoint_every}, keep={config.checkpoint_keep}")
    if config.access_token_ttl < 4 * config.heartbeat_interval:
        raise UserError(f"{where}: [security] access_token_ttl must be at least 4 heartbeat intervals "
                        f"({4 * config.heartbeat_interval:g}s), got {config.access_token_ttl:g}")
    for name in ("matchmaking_time", "averaging_timeout", "heartbeat_interval", "peer_timeout"):
        if getattr(config, name) <= 0:
            raise UserError(f"{where}: {name} must be > 0, got {getattr(config, name)}")
    _check_averaging(config.averaging, where)


def _check_averaging(averaging: AveragingConfig, where: str) -> None:
    for key, choices, hint in (("strategy", STRATEGIES, ""), ("compression", COMPRESSIONS, ""),
                               ("inner_state", INNER_STATES, ""),
                               ("aggregator", AGGREGATORS, " (centered_clip is the robust default)")):
        value = getattr(averaging, key)
        if value not in choices:
            raise UserError(f"{where}: [averaging] {key} must be one of {', '.join(choices)}, got {value!r}{hint}")
    if not (0 < averaging.tau <= 100):
        raise UserError(f"{where}: [averaging] tau must be in (0, 100] (the clip radius in units of the "
                        f"group's median distance), got {averaging.tau}")
    if averaging.inner_steps < 1:
        raise UserError(f"{where}: [averaging] inner_steps must be >= 1, got {averaging.inner_steps}")
    if not 0 < averaging.outer_lr <= 10:
        raise UserError(f"{where}: [averaging] outer_lr must be in (0, 10], got {averaging.outer_lr}")
    if not 0 <= averaging.outer_momentum < 1:
        raise UserError(f"{where}: [averaging] outer_momentum must be in [0, 1), got {averaging.outer_momentum}")
    _check_sparse(averaging, where)


def _check_sparse(averaging: AveragingConfig, where: str) -> None:
    if averaging.compression == "sparse" and averaging.strategy != "diloco":
        raise UserError(f"{where}: [averaging] compression = \"sparse\" needs strategy = \"diloco\" (its error "
                        f"feedback keeps what a round did not send for the next pseudo-gradient; sync gradients "
                        f"have no next round to carry it); use fp16 or uint8 with sync")
    chunk = averaging.sparse_chunk
    if not (16 <= chunk <= 65536 and chunk & (chunk - 1) == 0):
        raise UserError(f"{where}: [averaging] sparse_chunk must be a power of two from 16 to 65536, got {chunk}")
    if not 0 < averaging.sparse_density <= 0.5:
        raise UserError(f"{where}: [averaging] sparse_density must be in (0, 0.5] (the share of each chunk sent, "
                        f"e.g. 0.03125 for 1/32), got {averaging.sparse_density}")
    if averaging.sparse_density * chunk < 0.5:
        raise UserError(f"{where}: [averaging] sparse_density {averaging.sparse_density} keeps no value of a "
                        f"chunk of {chunk}; use a density of at least 1/{chunk} or a larger sparse_chunk")
    if averaging.sparse_bits not in SPARSE_BITS:
        raise UserError(f"{where}: [averaging] sparse_bits must be one of {', '.join(map(str, SPARSE_BITS))}, "
                        f"got {averaging.sparse_bits}")


def load_run_config(path: Path) -> RunConfig:
    """Read and parse a run.toml file, with errors that name the file."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"run file {path} does not exist; pass --run with the path of a run.toml") from None
    except OSError as error:
        raise UserError(f"cannot read run file {path}: {error.strerror}") from None
    return parse_run_config(text, where=str(path))
