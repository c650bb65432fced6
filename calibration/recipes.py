"""Recipes: which tensors get quantized, to what format, with which observer -- as data files.

A recipe is a YAML (or JSON) file; the built-in ones live in ``calibration/recipes/`` and are named by
their stem (``--recipe w8a8``), any other path is read as is. A new scheme is a new file, not code.
Fields (all checked on load, errors name the file and key):

``name``, ``description``; ``components`` (default set calibrated from the pipeline: a list, or a
mapping from component to its own scheme -- any of ``types``, ``weights``, ``inputs``, ``outputs``,
``exclude``, ``overrides`` -- over the top-level one, as the SNPE flow quantizes the text encoders,
UNet and VAE differently); ``methods``: the calibration methods to run, in order, each
``{kind, components, ...settings}`` (:mod:`calibration.methods`); ``types``
(module classes, default ``[Conv2d, Linear]``; ``MatMul`` adds the attention matmuls Q·Kᵀ and
softmax·V, both inputs quantized by ``inputs``, see :mod:`quant.attention`); ``weights`` / ``inputs`` / ``outputs``: a quantizer
``{dtype, symmetric, axis, observer, reduce_range}`` or ``null`` (off); ``exclude``: module-name patterns kept in
high precision; ``overrides``: ``[{match: [patterns], weights|inputs|outputs: {...} | null}]`` applied
in order (``operand: i`` with ``inputs`` sets input ``i`` alone: ``bmm_pv``'s operand 0 is the softmax output); ``shortcut_split: true`` quantizes each layer that reads a skip concatenation (the UNet's
up-block ``conv_shortcut``) per concatenated tensor, input and weight (Q-Diffusion's split,
:mod:`quant.shortcut_split`); ``calibration``: defaults for the capture (``timesteps``, ``num_prompts``).

Patterns: a glob (``*attn*.to_q``) is matched against the whole dotted name; a plain name
(``conv_shortcut``, ``time_embedding``) matches any run of whole dotted segments, like modelopt's
``filter_func_default`` does for SDXL. Input ``axis: channel`` means the layer's input-channel axis
(1 for Conv2d, -1 for Linear). ``reduce_range: true`` (8-bit integers only) computes scales for a 7-bit
grid inside the 8-bit type, as ONNX Runtime's ``reduce_range``: x86 CPUs without VNNI multiply u8 x s8
with ``VPMADDUBSW``, whose int16 sums of two products saturate unless weights stay within [-64, 64].
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from quant.attention import MatMul
from quant.encodings import EncodingsError
from quant.formats import get_format

from .observers import make_observer

RECIPE_DIR = Path(__file__).parent / "recipes"
SCHEME_KEYS = {"types", "weights", "inputs", "outputs", "exclude", "overrides", "shortcut_split"}
#: ``source`` is provenance (where a recipe came from), kept when a recorded recipe is loaded again
TOP_LEVEL_KEYS = {"name", "description", "components", "methods", "calibration", "source"} | SCHEME_KEYS
QUANTIZER_KEYS = {"dtype", "symmetric", "axis", "observer", "reduce_range"}
SLOTS = ("weights", "inputs", "outputs")
MODULE_TYPES = {"Conv2d": torch.nn.Conv2d, "Linear": torch.nn.Linear, "Conv1d": torch.nn.Conv1d, "MatMul": MatMul}
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


class RecipeError(EncodingsError):
    """A recipe that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor is quantized: format, symmetry, channel axis and observer."""

    dtype: str
    symmetric: bool
    axis: int | str | None
    observer: dict[str, Any]
    reduce_range: bool = False

    @property
    def fmt(self):
        return get_format(self.dtype)

    @property
    def grid(self):
        """The grid scales are computed for: the format's, or its 7-bit subrange with ``reduce_range``."""
        fmt = self.fmt
        if not self.reduce_range:
            return fmt
        if fmt.signed:
            return replace(fmt, qmin=-64, qmax=64 if self.symmetric else 63)
        return replace(fmt, qmin=0, qmax=127)

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "symmetric": self.symmetric, "axis": self.axis, "observer": dict(self.observer),
                "reduce_range": self.reduce_range}

    def resolved_axis(self, module: torch.nn.Module, slot: str) -> int | None:
        """``axis: channel`` -> the layer's channel axis for activations; ints pass through."""
        if self.axis != "channel":
            return self.axis
        if slot == "weights":
            return 0
        return -1 if isinstance(module, torch.nn.Linear) else 1


@dataclass(frozen=True)
class LayerPlan:
    """The quantizers of one matched module (``None`` = that slot stays in high precision)."""

    name: str
    module: torch.nn.Module
    weights: QuantizerSpec | None
    inputs: QuantizerSpec | None
    outputs: QuantizerSpec | None
    #: input-channel ranges quantized apart (shortcut splitting); empty: the tensors are quantized whole
    channel_groups: tuple[tuple[int, int], ...] = ()
    #: ``(operand, spec)`` for inputs an override set apart (a MatMul's softmax operand); others take ``inputs``
    operand_inputs: tuple[tuple[int, QuantizerSpec | None], ...] = ()

    def input_spec(self, index: int) -> QuantizerSpec | None:
        """The quantizer of input ``index``."""
        return dict(self.operand_inputs).get(index, self.inputs)


@dataclass(frozen=True)
class MethodConfig:
    """One entry of a recipe's ``methods:`` list: which method, on which components, with which settings."""

    kind: str
    components: tuple[str, ...]
    settings: Any  # the method's Settings dataclass

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "components": list(self.components), **asdict(self.settings)}


@dataclass
class Recipe:
    name: str
    description: str = ""
    components: tuple[str, ...] = ("unet",)
    types: tuple[str, ...] = ("Conv2d", "Linear")
    weights: QuantizerSpec | None = None
    inputs: QuantizerSpec | None = None
    outputs: QuantizerSpec | None = None
    exclude: tuple[str, ...] = ()
    overrides: list[dict[str, Any]] = field(default_factory=list)
    shortcut_split: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    methods: tuple[MethodConfig, ...] = ()
    #: per component, the scheme fields that component sets over the top-level ones (parsed)
    component_schemes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_component(self, component: str) -> "Recipe":
        """The recipe one component is calibrated with: its own scheme over the top level, its own methods."""
        scheme = self.component_schemes.get(component, {})
        return replace(self, **scheme, component_schemes={},
                       methods=tuple(m for m in self.methods if component in m.components))

    def to_json(self) -> dict[str, Any]:
        """The recipe as run, built from its fields (so a recipe built in code records itself truly).

        :func:`parse_recipe` reads it back to an equal recipe; encodings headers record it.
        """
        out: dict[str, Any] = {"name": self.name, "description": self.description, "source": self.source}
        out["components"] = ({c: _scheme_json(self.component_schemes[c]) if c in self.component_schemes else None
                              for c in self.components} if self.component_schemes else list(self.components))
        out.update(_scheme_json({"types": self.types, "weights": self.weights, "inputs": self.inputs,
                                 "outputs": self.outputs, "exclude": self.exclude, "overrides": self.overrides,
                                 "shortcut_split": self.shortcut_split}))
        out["methods"] = [m.to_json() for m in self.methods]
        out["calibration"] = dict(self.calibration)
        return out

    def plan(self, module: torch.nn.Module) -> tuple[list[LayerPlan], list[str]]:
        """Match the recipe against ``module``: quantized layers, and layers of a target type kept high precision."""
        from quant.shortcut_split import concat_boundaries

        types = tuple(MODULE_TYPES[t] for t in self.types)
        boundaries = concat_boundaries(module) if self.shortcut_split else {}
        plans, excluded = [], []
        for name, sub in module.named_modules():
            if not name or not isinstance(sub, types):
                continue
            if any(name_matches(name, p) for p in self.exclude):
                excluded.append(name)
                continue
            slots = {slot: getattr(self, slot) for slot in SLOTS}
            operands: dict[int, QuantizerSpec | None] = {}
            for override in self.overrides:
                if not any(name_matches(name, p) for p in override["match"]):
                    continue
                if "operand" in override:
                    if override["operand"] >= getattr(sub, "quantized_inputs", 1):
                        raise RecipeError(f"{self.name}: overrides: operand {override['operand']} of {name}: it has "
                                          f"{getattr(sub, 'quantized_inputs', 1)} quantized input(s)")
                    operands[override["operand"]] = override["inputs"]
                    continue
                for slot in SLOTS:
                    if slot in override:
                        slots[slot] = override[slot]
            if not any(slots.values()) and not any(operands.values()):
                excluded.append(name)
                continue
            groups = ((0, boundaries[name]), (boundaries[name], sub.in_channels)) if name in boundaries else ()
            plans.append(LayerPlan(name, sub, slots["weights"], slots["inputs"], slots["outputs"], groups,
                                   tuple(sorted(operands.items()))))
        return plans, excluded


def _scheme_json(scheme: dict[str, Any]) -> dict[str, Any]:
    """Scheme fields (parsed) as recipe JSON."""
    out: dict[str, Any] = {}
    for key, value in scheme.items():
        if key in SLOTS:
            out[key] = value.to_json() if value is not None else None
        elif key == "overrides":
            out[key] = [{k: (v.to_json() if isinstance(v, QuantizerSpec) else v) for k, v in o.items()} for o in value]
        elif key == "shortcut_split":
            out[key] = value
        else:
            out[key] = list(value)
    return out


def name_matches(name: str, pattern: str) -> bool:
    """Glob against the full name, or a plain pattern against whole dotted segments."""
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def _quantizer(value: Any, where: str) -> QuantizerSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecipeError(f"{where}: expected a quantizer mapping or null, got {type(value).__name__}")
    unknown = set(value) - QUANTIZER_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(QUANTIZER_KEYS))}")
    if "dtype" not in value:
        raise RecipeError(f"{where}: missing 'dtype'")
    try:
        fmt = get_format(str(value["dtype"]))
    except ValueError as exc:
        raise RecipeError(f"{where}.dtype: {exc}") from None
    axis = value.get("axis")
    if axis is not None and axis != "channel" and not isinstance(axis, int):
        raise RecipeError(f"{where}.axis: expected an integer, 'channel' or null, got {axis!r}")
    observer = value.get("observer", "minmax")
    observer = {"kind": observer} if isinstance(observer, str) else dict(observer)
    try:
        make_observer(observer, None)
    except ValueError as exc:
        raise RecipeError(f"{where}.observer: {exc}") from None
    symmetric = bool(value.get("symmetric", fmt.is_float or fmt.signed))
    if fmt.is_float and not symmetric:
        raise RecipeError(f"{where}: {fmt.name} quantizers are symmetric (no zero point)")
    reduce_range = bool(value.get("reduce_range", False))
    if reduce_range and (fmt.is_float or fmt.bits != 8):
        raise RecipeError(f"{where}.reduce_range: only 8-bit integer quantizers have a 7-bit reduced range")
    return QuantizerSpec(fmt.name, symmetric, axis, observer, reduce_range)


def _scheme(data: dict[str, Any], where: str) -> dict[str, Any]:
    """The scheme keys present in ``data``, parsed (types, quantizers, exclude patterns, overrides)."""
    scheme: dict[str, Any] = {}
    if "types" in data:
        types = tuple(data.get("types") or ("Conv2d", "Linear"))
        bad = [t for t in types if t not in MODULE_TYPES]
        if bad:
            raise RecipeError(f"{where}: types: unknown {', '.join(bad)}; choose from {', '.join(MODULE_TYPES)}")
        scheme["types"] = types
    for slot in SLOTS:
        if slot in data:
            scheme[slot] = _quantizer(data[slot], f"{where}: {slot}")
    if "exclude" in data:
        scheme["exclude"] = tuple(data.get("exclude") or ())
    if "shortcut_split" in data:
        if not isinstance(data["shortcut_split"], bool):
            raise RecipeError(f"{where}: shortcut_split: expected true or false, got {data['shortcut_split']!r}")
        scheme["shortcut_split"] = data["shortcut_split"]
    if "overrides" in data:
        overrides = []
        for i, override in enumerate(data.get("overrides") or []):
            here = f"{where}: overrides[{i}]"
            if not isinstance(override, dict) or not override.get("match"):
                raise RecipeError(f"{here}: needs a 'match' list of patterns")
            extra = set(override) - {"match", "operand", *SLOTS}
            if extra:
                raise RecipeError(f"{here}: unknown key(s) {', '.join(sorted(extra))}")
            match = override["match"]
            parsed = {"match": [match] if isinstance(match, str) else list(match)}
            if "operand" in override:
                operand = override["operand"]
                if not isinstance(operand, int) or isinstance(operand, bool) or operand < 0:
                    raise RecipeError(f"{here}: operand: expected an input index (0, 1), got {operand!r}")
                if set(override) & set(SLOTS) != {"inputs"}:
                    raise RecipeError(f"{here}: an override with an operand sets that input's quantizer: "
                                      "'inputs' only")
                parsed["operand"] = operand
            for slot in SLOTS:
                if slot in override:
                    parsed[slot] = _quantizer(override[slot], f"{here}.{slot}")
            overrides.append(parsed)
        scheme["overrides"] = overrides
    return scheme


def _components(value: Any, source: str) -> tuple[tuple[str, ...], dict[str, dict[str, Any]]]:
    """``components``: a list of names, or a mapping name -> that component's own scheme (or null)."""
    if isinstance(value, dict):
        names, schemes = tuple(value), {}
        for name, own in value.items():
            if own is None:
                continue
            if not isinstance(own, dict):
                raise RecipeError(f"{source}: components.{name}: expected a mapping of scheme keys or null")
            unknown = set(own) - SCHEME_KEYS
            if unknown:
                raise RecipeError(f"{source}: components.{name}: unknown key(s) {', '.join(sorted(unknown))}; "
                                  f"a component sets {', '.join(sorted(SCHEME_KEYS))}")
            schemes[name] = _scheme(own, f"{source}: components.{name}")
    else:
        names, schemes = tuple(value or ("unet",)), {}
    bad = [c for c in names if c not in COMPONENTS]
    if bad:
        raise RecipeError(f"{source}: components: unknown {', '.join(bad)}; choose from {', '.join(COMPONENTS)}")
    return names, schemes


def _methods(value: Any, components: tuple[str, ...], source: str) -> tuple[MethodConfig, ...]:
    from .methods import method_class, parse_settings

    methods = []
    for i, entry in enumerate(value or []):
        where = f"{source}: methods[{i}]"
        if not isinstance(entry, dict) or not entry.get("kind"):
            raise RecipeError(f"{where}: a method is a mapping with a 'kind'")
        cls = method_class(str(entry["kind"]))
        targets = entry.get("components", list(components))
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        outside = [c for c in targets if c not in components]
        if outside:
            raise RecipeError(f"{where}: components {', '.join(outside)} are not calibrated by this recipe "
                              f"({', '.join(components)})")
        settings = parse_settings(cls, {k: v for k, v in entry.items() if k not in ("kind", "components")}, where)
        methods.append(MethodConfig(cls.kind, targets, settings))
    return tuple(methods)


def parse_recipe(data: Any, source: str) -> Recipe:
    """Validate a recipe mapping; every error message starts with ``source`` and the key."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping")
    unknown = set(data) - TOP_LEVEL_KEYS
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")
    if not data.get("name"):
        raise RecipeError(f"{source}: missing 'name'")
    source = str(data.get("source") or source)
    components, schemes = _components(data.get("components"), source)
    recipe = Recipe(str(data["name"]), str(data.get("description", "")), components, source=source,
                    calibration=dict(data.get("calibration") or {}), component_schemes=schemes,
                    methods=_methods(data.get("methods"), components, source),
                    **_scheme({k: data[k] for k in SCHEME_KEYS if k in data}, source))
    for component in components:
        own = recipe.for_component(component)
        where = source if component not in schemes else f"{source}: components.{component}"
        if not any((own.weights, own.inputs, own.outputs)) and not own.overrides:
            raise RecipeError(f"{where}: quantizes nothing (weights, inputs and outputs are all null)")
        if own.shortcut_split and own.inputs is not None and own.inputs.axis is not None:
            raise RecipeError(f"{where}: shortcut_split quantizes each concatenated input per tensor (TensorRT has "
                              "no per-channel activation scales); use inputs axis: null")
    return recipe


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path | Recipe | dict) -> Recipe:
    """``w8a8`` (built-in), a path to a ``.yaml``/``.json`` file, a mapping, or a Recipe (returned as is)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return parse_recipe(name_or_path, "<recipe>")
    path = Path(name_or_path)
    if not path.is_file():
        builtin = RECIPE_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise RecipeError(f"recipe {name_or_path!r} is neither a file nor a built-in recipe "
                              f"({', '.join(builtin_recipes())})")
        path = builtin
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError / JSONDecodeError: report, don't trace
        raise RecipeError(f"{path}: cannot parse: {exc}") from None
    source = path.stem if path.parent == RECIPE_DIR else str(path)
    return parse_recipe(data, source)
