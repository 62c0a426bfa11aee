"""The settings of ``python -m analyses.replicate``: one TOML file (``tomllib``) read into frozen dataclasses.

Everything is checked before a weight loads (STYLE 5): an unknown key, a value of the wrong type, a data set or
model that does not exist, a device the machine does not have — each is ``BadInput`` naming the key
(``models.experts[2]``, ``finetune.runs.mixed``, ``device``), so the command exits 2 with one line and writes
nothing. ``analyses/configs/`` holds the default (the organisms), ``quick.toml`` (CI) and ``paper-7b.toml`` (the
paper's models on a GPU box, documented line by line).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from analyses.finetune import RUN_ONLY_SETTINGS, check_data_label
from probe.devices import Placement
from probe.errors import BadInput, in_path

if TYPE_CHECKING:  # annotations only: the loop is imported when a config is checked
    from probe.train import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "organisms.toml"
QUICK_CONFIG = CONFIG_DIR / "quick.toml"
MERGE_METHODS = ("average", "shift", "salience", "ties")
GENERATED = "generated"  # heads.data / finetune data: the items made by the [train] generate step
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Models:
    base: str  # the base LLM (the paper: qwen2)
    experts: list[str]  # modality-extended models of it (the paper: qwen2-vl, llava-ov-si, llava-video)
    own: list[str]  # per expert: the label in [data] of its own modality (Figure 2, Table 5)
    paper: list[str] = field(default_factory=list)  # per expert: the paper model it stands for (report labels)


@dataclass(frozen=True)
class Eval:
    split: str = "validation"
    limit: int | None = None  # first N items of every set; None = all
    batch_size: int | None = None  # items per forward; None (0 or left out) = probe.eval's default for the device
    generate: bool = True  # greedy generation for accuracy (else probability accuracy only)
    text: str = "text"  # the label in [data] of the text set (Tables 3 and 4)


@dataclass(frozen=True)
class Train:
    """Training items: ``generate`` > 0 writes that many per subject with the organisms' generators
    (``probe.zoo.build.build_fresh_data``, split ``train``, seed ``seed``: none a validation item); else ``data``
    names MMMU-layout dirs."""

    generate: int = 0
    seed: int = 1
    data: dict[str, str] = field(default_factory=dict)  # label → dir with a train split


@dataclass(frozen=True)
class Heads:
    data: str = "eval"  # "eval": each expert's [data] set; "generated": its training items (the same label)
    split: str = "validation"
    limit: int | None = None
    generate: bool = True
    base_on_text: bool = True  # also sweep the base on the text set (Figure 2's reference; salience base run)
    batch_size: int = 8


@dataclass(frozen=True)
class Merge:
    methods: list[str] = field(default_factory=lambda: list(MERGE_METHODS))
    alpha0: float = 0.5
    temperature: float = 1e-3
    density: float = 0.2
    lam: float = 1.0
    salience_metric: str = "kl"
    salience_temperature: float = 1.0
    salience_base: bool = False  # give the salience merge the base's text run (then the base competes too)


@dataclass(frozen=True)
class Finetune:
    carrier: str  # which expert's carrier of the Eq. 4 merge is fine-tuned (it must read every trained modality)
    runs: dict[str, dict[str, float]]  # run name → mix over training labels, e.g. mixed = {text=3, image=2, video=1}
    steps: int
    save_steps: list[int]
    eval_data: list[str]  # [data] labels each checkpoint is evaluated on (Figure 3)
    batch_size: int = 16
    lr: float = 1e-4
    lm_lr: float = 1e-4
    warmup: int = 10
    eval_limit: int | None = None
    lora: int | None = None  # LoRA rank (analyses.finetune --lora); None = full fine-tuning, as the paper
    # how a step runs (analyses.finetune --micro-batch, --gradient-checkpointing), not what it computes: outside
    # the stages' fingerprints (RUN_ONLY), so a run that ran out of memory resumes with them
    micro_batch: int | None = None
    gradient_checkpointing: bool = False


# settings of how a stage runs, not of what it computes: left out of its fingerprint, so a stage that ran out of
# memory resumes with them (probe.eval and probe.heads keep --batch-size outside their runs' identity too)
RUN_ONLY = {"finetune": RUN_ONLY_SETTINGS, "eval": ("batch_size",), "heads": ("batch_size",)}


@dataclass(frozen=True)
class Trajectory:
    sketch_dim: int = 256
    perplexity: float = 30.0


@dataclass(frozen=True)
class Paper:
    """What the run's sets stand for in the paper: read by the report's verdicts only, so in no stage's fingerprint
    (a run gains or changes it without a stage rerunning)."""

    # the column of the paper's Tables 3 and 4 (figures.paper.TEXT_COLUMNS) that eval.text stands for: the text
    # verdicts then compare the run with the paper's numbers there; "" = none, the paper's general claim
    text_column: str = ""


@dataclass(frozen=True)
class ReplicateConfig:
    models: Models
    data: dict[str, str]  # evaluation sets: label → MMMU-layout dir (relative to the config file), or "mmmu"
    finetune: Finetune
    eval: Eval = field(default_factory=Eval)
    train: Train = field(default_factory=Train)
    heads: Heads = field(default_factory=Heads)
    merge: Merge = field(default_factory=Merge)
    trajectory: Trajectory = field(default_factory=Trajectory)
    paper: Paper = field(default_factory=Paper)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    source: str = ""  # the file it came from (not a key)

    def section(self, name: str) -> dict[str, Any]:
        """One section plus what every stage shares, as plain data: the input of a stage's fingerprint."""
        common = {"device": self.device, "dtype": self.dtype, "seed": self.seed}
        keep = {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if k not in RUN_ONLY.get(name, ())}
        return json.loads(json.dumps(keep | common, sort_keys=True))

    def train_dirs(self, out: Path) -> dict[str, str]:
        return ({k: str(out / "data" / k) for k in ("text", "image", "image_single", "video")}
                if self.train.generate else dict(self.train.data))


def _typed(value: Any, hint: Any, key: str) -> Any:
    """Check one TOML value against a dataclass field's type hint; nested dataclasses recurse."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise BadInput(f"config key {key!r}: expected a table")
        return _build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None or (type(value) is int and value == 0 and type(None) in args and int in args):
            return None  # TOML has no null: 0 means "none" for an optional limit
        return _typed(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, list):
            raise BadInput(f"config key {key!r}: expected a list")
        (inner,) = typing.get_args(hint)
        return [_typed(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInput(f"config key {key!r}: expected a table")
        _, inner = typing.get_args(hint)
        return {str(k): _typed(v, inner, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool) \
            or not isinstance(value, hint):
        raise BadInput(f"config key {key!r}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for k in table:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise BadInput(f"config key {where!r}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BadInput(f"config key {where!r}: missing")
            continue
        kwargs[f.name] = _typed(table[f.name], hints[f.name], where)
    return cls(**kwargs)


def parse_config(path: Path) -> ReplicateConfig:
    """Read and type-check the file; no path or machine is looked at yet."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BadInput(f"--config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # a file saved in another encoding, or no text: was a traceback
        raise BadInput(f"--config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"--config {path}: not valid TOML ({exc})") from None
    cfg = _build(ReplicateConfig, table)
    check_values(cfg)
    here = Path(path).resolve().parent  # relative directories are relative to the config file, not the cwd
    data = {k: v if v.lower() == "mmmu" else str((here / v).resolve()) for k, v in cfg.data.items()}
    train = dataclasses.replace(cfg.train, data={k: str((here / v).resolve()) for k, v in cfg.train.data.items()})
    models = dataclasses.replace(cfg.models, base=_model_at(here, cfg.models.base),
                                 experts=[_model_at(here, m) for m in cfg.models.experts])
    finetune = dataclasses.replace(cfg.finetune, carrier=_model_at(here, cfg.finetune.carrier))
    return dataclasses.replace(cfg, models=models, data=data, train=train, finetune=finetune, source=str(path))


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a hub repo's id: "Qwen/Qwen2-VL-7B-Instruct"


def _model_at(here: Path, spec: str) -> str:
    """A model directory as the config file names it: absolute, links kept (its name labels the model's rows and
    per-model dirs); an alias as it is, and a hub repo id that names no directory (next to the config or in the
    cwd): probe.models then refuses it by the name the config gives (it had named <config dir>/Qwen/…)."""
    from probe.families import ALIASES

    if spec in ALIASES:
        return spec
    path = in_path(spec)
    at = os.path.normpath(here / path)
    return spec if HUB_ID.fullmatch(spec) and not Path(at).exists() and not path.exists() else at


def _not_beside(cfg: ReplicateConfig, spec: str) -> str:
    """For a refused model kept as written (``_model_at``: a hub repo id's shape): where a folder of that name was
    looked for, since relative folders are read beside the config."""
    if Path(spec).is_absolute() or not cfg.source:
        return ""
    from probe.families import ALIASES

    return "" if spec in ALIASES else f"; nor a folder beside the config ({Path(cfg.source).resolve().parent / spec})"


def saved_config(table: Any, path: Path) -> ReplicateConfig:
    """The config a run saved in its replicate.json (``dataclasses.asdict`` of the parsed one), typed again."""
    if not isinstance(table, dict):
        raise BadInput(f"{path}: no config table")
    try:
        cfg = _build(ReplicateConfig, {k: v for k, v in table.items() if k != "source"})
        check_paper(cfg)  # the report's verdicts look its column up in the paper's tables
    except BadInput as exc:
        raise BadInput(f"{path}: its config is not one python -m analyses.replicate wrote ({exc})") from None
    return dataclasses.replace(cfg, source=str(table.get("source", "")))


def _check_finite(value: Any, key: str) -> None:
    """Every float of the config, however deep (TOML reads ``nan`` and ``inf``): a NaN slips past range tests
    (``nan <= 0`` is false) into a NaN merge or a NaN fine-tuning run that still exits 0."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadInput(f"config key {key!r}: must be a finite number, got {value}")


def check_paper(cfg: ReplicateConfig) -> None:
    """paper.text_column is a Table 3 column a text set's accuracy can stand for, and each expert stands for a model
    with a Table 3 row to compare with there (models.paper)."""
    col = cfg.paper.text_column
    if not col:
        return
    from figures.paper import BASE, TABLE3, TEXT_COLUMNS

    if col not in TEXT_COLUMNS:
        raise BadInput(f"config key 'paper.text_column': {col!r} is not a Table 3 column a text set's accuracy can "
                       f"stand for (choose from {', '.join(TEXT_COLUMNS)}; or leave it out)")
    rows = [m for m in TABLE3 if m != BASE]
    if not cfg.models.paper:
        raise BadInput(f"config key 'models.paper': paper.text_column = {col!r} compares each expert with its paper "
                       f"model's Table 3 row; name one per expert ({', '.join(rows)})")
    for i, name in enumerate(cfg.models.paper):
        if name not in rows:
            raise BadInput(f"config key 'models.paper[{i}]': {name!r} has no row in the paper's Table 3 to compare "
                           f"with on paper.text_column (its rows: {', '.join(rows)})")


def check_values(cfg: ReplicateConfig) -> None:
    """Ranges and cross-references between keys (still nothing read from disk)."""
    _check_finite(cfg, "")
    m = cfg.models
    if not m.experts:
        raise BadInput("config key 'models.experts': give at least one expert")
    if len(set([m.base, *m.experts])) != len(m.experts) + 1:
        raise BadInput("config key 'models.experts': a model is listed twice (or is the base)")
    if len(m.own) != len(m.experts):
        raise BadInput(f"config key 'models.own': give one [data] label per expert ({len(m.experts)})")
    if m.paper and len(m.paper) != len(m.experts):
        raise BadInput(f"config key 'models.paper': give one paper model per expert ({len(m.experts)})")
    check_paper(cfg)
    for i, label in enumerate(m.own):
        if label not in cfg.data:
            raise BadInput(f"config key 'models.own[{i}]': {label!r} is not a label in [data]")
    if cfg.eval.text not in cfg.data:
        raise BadInput(f"config key 'eval.text': {cfg.eval.text!r} is not a label in [data]")
    for key, v in (("eval.limit", cfg.eval.limit), ("heads.limit", cfg.heads.limit),
                   ("finetune.eval_limit", cfg.finetune.eval_limit)):
        if v is not None and v < 1:
            raise BadInput(f"config key {key!r}: must be ≥ 1 (0 = all items)")
    if cfg.finetune.lora is not None and cfg.finetune.lora < 1:
        raise BadInput(f"config key 'finetune.lora': a LoRA rank is ≥ 1, got {cfg.finetune.lora} (0 or left out = "
                       "full fine-tuning)")
    for key, v in (("eval.batch_size", cfg.eval.batch_size), ("heads.batch_size", cfg.heads.batch_size),
                   ("finetune.batch_size", cfg.finetune.batch_size), ("finetune.steps", cfg.finetune.steps)):
        if v is not None and v < 1:
            raise BadInput(f"config key {key!r}: must be ≥ 1")
    from analyses.sketch import SKETCH_DIMS  # torch: here, so that figures reads a saved config without it

    if cfg.trajectory.sketch_dim not in SKETCH_DIMS:  # analyses.trajectory's own range, met only at the end
        raise BadInput(f"config key 'trajectory.sketch_dim': must be in {SKETCH_DIMS.start} .. {SKETCH_DIMS.stop - 1}")
    if not 0 <= cfg.seed < 2**32:  # the t-SNE of the trajectory stage (sklearn) takes no other seed
        raise BadInput(f"config key 'seed': must be in 0 .. 2^32 - 1, got {cfg.seed}")
    if cfg.train.seed < 0:
        raise BadInput(f"config key 'train.seed': must be ≥ 0, got {cfg.train.seed}")
    if cfg.train.generate < 0:
        raise BadInput("config key 'train.generate': must be ≥ 0")
    if not cfg.train.generate and not cfg.train.data:
        raise BadInput("config key 'train.data': give training sets (label = dir), or train.generate > 0")
    if cfg.train.generate and cfg.train.data:  # the generated items would be trained on, these sets never read
        raise BadInput("config key 'train.data': set train.generate = 0 to train on these sets (with "
                       f"train.generate = {cfg.train.generate} the generated items are used instead)")
    for label in cfg.train.data:  # the finetune stage's --data labels: refused there, after every stage before it
        check_data_label(label, "config key 'train.data':")
    if cfg.heads.data not in ("eval", GENERATED):
        raise BadInput(f"config key 'heads.data': 'eval' or '{GENERATED}', got {cfg.heads.data!r}")
    if cfg.heads.data == GENERATED and not cfg.train.generate:
        raise BadInput(f"config key 'heads.data': '{GENERATED}' needs train.generate > 0")
    if cfg.heads.data == GENERATED:
        if cfg.heads.split != "train":  # the data stage writes that split only
            raise BadInput(f"config key 'heads.split': heads.data = '{GENERATED}' has the split 'train' only, got "
                           f"{cfg.heads.split!r}")
        made = set(cfg.train_dirs(Path(".")))
        for key, label in [(f"models.own[{i}]", x) for i, x in enumerate(m.own)] + [("eval.text", cfg.eval.text)]:
            if label not in made:
                raise BadInput(f"config key {key!r}: heads.data = '{GENERATED}' has no {label!r} items "
                               f"(generated: {', '.join(sorted(made))})")
    bad = [x for x in cfg.merge.methods if x not in MERGE_METHODS]
    if bad or not cfg.merge.methods:
        raise BadInput(f"config key 'merge.methods': choose from {', '.join(MERGE_METHODS)}, got {bad or '[]'}")
    for i, x in enumerate(cfg.merge.methods):  # table4 evaluates each merge once: probe.eval refuses a model given
        if x in cfg.merge.methods[:i]:  # twice, at the table4 stage, after table3, heads, shift and merge had run
            raise BadInput(f"config key 'merge.methods[{i}]': {x!r} is listed twice")
    for needed in ("average", "shift"):  # Table 4/5's two rows of the paper and the merge Figure 3 starts from
        if needed not in cfg.merge.methods:
            raise BadInput(f"config key 'merge.methods': must include {needed!r} (the paper's Eq. 1 and Eq. 4)")
    if cfg.merge.salience_metric not in ("kl", "accuracy_drop", "prob_accuracy_drop"):
        raise BadInput("config key 'merge.salience_metric': kl, accuracy_drop or prob_accuracy_drop")
    if cfg.merge.salience_metric == "accuracy_drop" and not cfg.heads.generate:
        raise BadInput("config key 'merge.salience_metric': accuracy_drop needs heads.generate = true")
    if cfg.merge.salience_base and "salience" in cfg.merge.methods and not cfg.heads.base_on_text:
        # the merge stage reads the base's text sweep, which only heads.base_on_text makes: it stopped there, after
        # table3, heads and shift had run
        raise BadInput("config key 'merge.salience_base': the salience merge would read the base's sweep on text, "
                       "which heads.base_on_text = false does not make; set one of them")
    if not 0 <= cfg.merge.alpha0 <= 1:
        raise BadInput("config key 'merge.alpha0': must be in [0, 1]")
    for key, v in (("merge.temperature", cfg.merge.temperature),
                   ("merge.salience_temperature", cfg.merge.salience_temperature),
                   ("trajectory.perplexity", cfg.trajectory.perplexity)):
        if not v > 0:
            raise BadInput(f"config key {key!r}: must be > 0")
    if not 0 < cfg.merge.density <= 1:
        raise BadInput("config key 'merge.density': must be in (0, 1]")
    if not cfg.merge.lam > 0:  # TIES adds λ × the merged task vector: ≤ 0 is the base, or away from the experts
        raise BadInput(f"config key 'merge.lam': must be > 0, got {cfg.merge.lam}")
    if "ties" in cfg.merge.methods:  # the merge's own refusal (λ past float32's range), now and not at the merge stage
        from analyses.merge import MergeConfig

        try:
            MergeConfig(models=list(m.experts), method="ties", out=Path("."), base=m.base,
                        lam=cfg.merge.lam).check_float32_range()
        except BadInput as exc:
            raise BadInput(f"config key 'merge.lam': {exc}") from None
    ft = cfg.finetune
    for key, v in (("finetune.lr", ft.lr), ("finetune.lm_lr", ft.lm_lr)):
        if v < 0:  # a negative rate climbs the loss (gradient ascent); 0 freezes that part, as in analyses.finetune
            raise BadInput(f"config key {key!r}: must be ≥ 0 (0 freezes its part), got {v}")
    if ft.lr == 0 and ft.lm_lr == 0:
        raise BadInput("config key 'finetune.lm_lr': finetune.lr and finetune.lm_lr are both 0, nothing would train")
    if not 0 <= ft.warmup < ft.steps:
        raise BadInput(f"config key 'finetune.warmup': must be ≥ 0 (0: no warm-up) and below finetune.steps "
                       f"({ft.steps}), got {ft.warmup}")
    if ft.carrier not in m.experts:
        raise BadInput(f"config key 'finetune.carrier': {ft.carrier!r} is not one of models.experts")
    if not ft.runs:
        raise BadInput("config key 'finetune.runs': give at least one run")
    labels = set(cfg.train_dirs(Path("."))) if cfg.train.generate else set(cfg.train.data)
    for name, mix in ft.runs.items():
        if not RUN_NAME.fullmatch(name):  # DIR/finetune/<name> and DIR/steps/<name>: never a path out of them
            raise BadInput(f"config key 'finetune.runs.{name}': a run name is a plain directory name (letters, "
                           "digits, '.', '_', '-'; not starting with '.')")
        if not mix or any(w <= 0 for w in mix.values()):
            raise BadInput(f"config key 'finetune.runs.{name}': give positive weights per training label")
        for label in mix:
            if label not in labels:
                raise BadInput(f"config key 'finetune.runs.{name}': {label!r} is not a training label "
                               f"({', '.join(sorted(labels))})")
    bad_steps = [s for s in ft.save_steps if not 0 <= s <= ft.steps]
    if bad_steps:
        raise BadInput(f"config key 'finetune.save_steps': {bad_steps} outside 0..{ft.steps}")
    if not ft.eval_data:
        raise BadInput("config key 'finetune.eval_data': give at least one [data] label to evaluate checkpoints on")
    for i, label in enumerate(ft.eval_data):
        if label not in cfg.data:
            raise BadInput(f"config key 'finetune.eval_data[{i}]': {label!r} is not a label in [data]")
        if label in ft.eval_data[:i]:  # probe.eval refuses a set given twice: at the steps stage, after fine-tuning
            raise BadInput(f"config key 'finetune.eval_data[{i}]': {label!r} is listed twice")
    try:  # the training loop's own refusals (a rate past float32's range), now and not at the finetune stage
        train_config(cfg)
    except BadInput as exc:
        raise BadInput(f"config key 'finetune': {exc}") from None


def train_config(cfg: ReplicateConfig, autocast: str | None = None) -> TrainConfig:
    """The finetune stage's training-loop settings (its rates decide what trains; ``autocast`` its forward's
    precision, as analyses.finetune sets it from the placement)."""
    from probe.train import TrainConfig

    ft = cfg.finetune
    return TrainConfig(steps=ft.steps, lr=ft.lr, lm_lr=ft.lm_lr, batch=ft.batch_size, warmup=ft.warmup, seed=cfg.seed,
                       autocast=autocast, micro_batch=ft.micro_batch, checkpointing=ft.gradient_checkpointing)


def check_machine(cfg: ReplicateConfig) -> tuple[dict[str, str], Placement]:
    """Paths, aliases and devices: resolved (hub aliases from the cache) before any weight loads. Returns each
    model's resolved path, and where and in what precision the stages run."""
    from analyses.finetune import weights_dtype
    from probe.devices import resolve_placement
    from probe.models import resolve_model

    try:
        resolve_placement(cfg.device, "auto")
    except BadInput as exc:
        raise BadInput(f"config key 'device': {exc}") from None
    try:
        placement = resolve_placement(cfg.device, cfg.dtype)
        # the finetune stage's own refusals (float16), found before the stages that run ahead of it
        trained = weights_dtype(placement, cfg.finetune.lora)
    except BadInput as exc:
        raise BadInput(f"config key 'dtype': {exc}") from None
    dirs = [(f"data.{k}", v) for k, v in cfg.data.items()]
    dirs += [] if cfg.train.generate else [(f"train.data.{k}", v) for k, v in cfg.train.data.items()]
    for key, d in dirs:
        if d.lower() != "mmmu" and not Path(d).is_dir():
            raise BadInput(f"config key {key!r}: {d} is not a directory")
    from probe.mmmu import data_location

    named: dict[str, str] = {}
    for label, d in cfg.data.items():  # table3 evaluates every set in one probe.eval, which refuses one given twice
        if (first := named.setdefault(data_location(d), label)) != label:
            raise BadInput(f"config key 'data.{label}': {d} is the set data.{first} names too; give each label a "
                           "set of its own")
    refs = {}
    for key, spec in [("models.base", cfg.models.base)] + [(f"models.experts[{i}]", e)
                                                          for i, e in enumerate(cfg.models.experts)]:
        try:
            refs[key] = resolve_model(spec)
        except BadInput as exc:
            raise BadInput(f"config key {key!r}: {exc}{_not_beside(cfg, spec)}") from None
    check_names(cfg)
    check_lm_geometry(refs)
    check_modalities_read(cfg, refs)
    from probe.models import check_fits, check_spread_trains_fits, check_trains_fits

    for key, ref in refs.items():  # a 7B model in float32 on a small machine: now, not at the first stage's load
        try:
            check_fits(ref, placement.dtype, placement.all_devices, placement.device_memory, placement.memory_kind)
        except BadInput as exc:
            raise BadInput(f"config key {key!r}: {exc}") from None
    carrier = refs[f"models.experts[{cfg.models.experts.index(cfg.finetune.carrier)}]"]  # its carrier's shape
    try:  # fine-tuning holds the weights in float32 whatever dtype evaluates: twice bfloat16's bytes
        check_fits(carrier, trained, placement.all_devices, placement.device_memory, placement.memory_kind)
        tcfg = train_config(cfg, "bfloat16" if placement.dtype == "bfloat16" else None)
        if cfg.finetune.lora is None and not placement.spread:  # and gradients and AdamW moments: 7B needs ~120 GB
            check_trains_fits(carrier, trained, placement.device, next(iter(placement.device_memory), None), tcfg)
        elif cfg.finetune.lora is None:  # split over the process's GPUs: each one's share
            check_spread_trains_fits(carrier, trained, placement.all_devices, placement.device_memory, tcfg)
    except BadInput as exc:
        raise BadInput(f"config key 'finetune.carrier': {exc}") from None
    return {r.spec: str(r.path) for r in refs.values()}, placement


def check_names(cfg: ReplicateConfig) -> None:
    """Base and experts have distinct directory names (``analyses.merge.carrier_name``): the stages write each
    model's heads sweep, carriers and table5 run under its name, so two checkpoints both called ``final`` would
    share one sweep and one carrier dir (the merge names the second ``final-2``, which table5 would never read)."""
    from analyses.merge_methods import carrier_name

    seen: dict[str, str] = {}
    for key, spec in [("models.base", cfg.models.base)] + [(f"models.experts[{i}]", e)
                                                          for i, e in enumerate(cfg.models.experts)]:
        name = carrier_name(spec)
        if name in seen:
            raise BadInput(f"config key {key!r}: {spec} has the directory name {name!r} of {seen[name]}, and the "
                           "stages' per-model dirs are named so; give the checkpoints distinct directory names")
        seen[name] = key


def check_lm_geometry(refs: dict[str, Any]) -> None:
    """Every expert's LM is the base's: layers, heads and sizes from config.json, then (weights on disk) the LM
    tensors' names and shapes from the safetensors headers with analyses.align, the check the shift and merge
    stages make, so a mismatch stops here and not after table3 and heads have run. No weight is read."""
    from contextlib import ExitStack

    from analyses.align import align
    from analyses.checkpoints import open_checkpoint

    base = refs["models.base"]
    for key, ref in refs.items():
        if ref.geometry != base.geometry:
            raise BadInput(f"config key {key!r}: the LM of {ref.spec} has {ref.geometry.describe()}, the base "
                           f"{base.spec} {base.geometry.describe()}; experts must be fine-tunes of models.base")
    if any(r.hub_repo or r.gguf_file for r in refs.values()):
        return  # hub weights are fetched when a stage first needs them; their configs agreed above
    with ExitStack() as stack:
        try:
            ckpts = [stack.enter_context(open_checkpoint(str(r.path))) for r in refs.values()]
            align(ckpts, [r.spec for r in refs.values()])
        except BadInput as exc:
            raise BadInput(f"config key 'models.experts': {exc}") from None
    from probe.models import preflight

    for key, ref in refs.items():  # every tensor (vision tower too) against its config: meta device, no weight read
        try:
            preflight(ref)
        except BadInput as exc:
            raise BadInput(f"config key {key!r}: {exc}") from None


def check_modalities_read(cfg: ReplicateConfig, refs: dict[str, Any]) -> None:
    """Each model reads the items its stages give it (probe.prompting.check_modalities, as probe.eval and
    analyses.finetune do): an expert its own set (heads, table5), the base the text set, the fine-tuned carrier
    every trained label. Items are read, not weights; "mmmu" (a download) is left to the stage."""
    from probe.mmmu import load_items
    from probe.prompting import check_modalities
    from probe.zoo import validation_dir

    m = cfg.models
    experts = {spec: refs[f"models.experts[{i}]"] for i, spec in enumerate(m.experts)}
    loaded: dict[tuple, list] = {}

    def source(label: str, generated: bool, path: str | None, split: str, limit: int | None) -> tuple | None:
        if generated:  # not made yet: the bundled set of that label comes from the same generator (same modality)
            try:
                return str(validation_dir(label)), "validation", None
            except BadInput:
                return None
        return None if path is None or path.lower() == "mmmu" else (path, split, limit)

    h, e, gen = cfg.heads, cfg.eval, cfg.heads.data == GENERATED
    jobs = []  # (config key, model, label, what reads it, where the items are)
    for i, (spec, label) in enumerate(zip(m.experts, m.own)):
        jobs.append((f"models.own[{i}]", experts[spec], label, "the heads stage",
                     source(label, gen, cfg.data.get(label), h.split, h.limit)))
        jobs.append((f"models.own[{i}]", experts[spec], label, "table5",
                     source(label, False, cfg.data.get(label), e.split, e.limit)))
    if h.base_on_text:
        jobs.append(("eval.text", refs["models.base"], e.text, "the heads stage",
                     source(e.text, gen, cfg.data.get(e.text), h.split, h.limit)))
    for name, mix in cfg.finetune.runs.items():
        for label in mix:
            jobs.append((f"finetune.runs.{name}", experts[cfg.finetune.carrier], label, "fine-tuning",
                         source(label, bool(cfg.train.generate), cfg.train.data.get(label), "train", None)))
    for key, ref, label, what, src in jobs:
        if src is None:
            continue
        try:
            if src not in loaded:
                loaded[src] = load_items(src[0], split=src[1], limit=src[2])[0]
            check_modalities(ref, loaded[src])
        except BadInput as exc:
            raise BadInput(f"config key {key!r}: {what} would give {ref.spec} the {label!r} items: {exc}") from None
    for label, path in cfg.data.items():  # every set the eval stages read (table3/4, the steps), in eval.split:
        src = source(label, False, path, e.split, e.limit)  # a set converted under another split name stopped the
        if src is not None and src not in loaded:  # table3 stage, not this check
            try:
                load_items(src[0], split=src[1], limit=src[2])  # (path, split, limit): not load_items' order
            except BadInput as exc:
                raise BadInput(f"config key 'data.{label}': {exc}") from None
