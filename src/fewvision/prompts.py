"""Classes and prompt templates for text-based heads.

A class is a name with optional synonyms and descriptions, given inline (``"ok,scratch,dent"``) or in a YAML/JSON
file. Its prompts are every template filled with the name and each synonym, plus each description verbatim.
Templates are named sets (``openai``: open_clip's 80 ImageNet templates; ``simple``: open_clip's short set;
``industrial``: written for inspection images) or literal strings with ``{}`` where the class name goes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

# Written for close-up product and material photos: they name the surface and the inspection setting, which a
# web-trained text encoder associates with defect vocabulary better than "a photo of a {}".
INDUSTRIAL_TEMPLATES = (
    "a photo of {} on a product surface.",
    "a close-up photo of {}.",
    "an industrial inspection image showing {}.",
    "a macro photo of a material with {}.",
    "a quality control photo of {}.",
    "a photo of a manufactured part with {}.",
    "a grayscale inspection image of {}.",
    "a high-resolution image of {} on a production line.",
)

DEFAULT_TEMPLATE_SET = "industrial"


class PromptError(ValueError):
    """Bad classes or templates; the message names the file or the value."""


@dataclass
class ClassSpec:
    name: str
    synonyms: list[str] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)

    def prompts(self, templates: Sequence[str]) -> list[str]:
        phrases = [self.name, *self.synonyms]
        return [t.format(p) for p in phrases for t in templates] + list(self.descriptions)

    def to_dict(self) -> dict:
        return {"name": self.name, "synonyms": list(self.synonyms), "descriptions": list(self.descriptions)}


TEMPLATE_SETS = ("openai", "simple", "industrial")


def template_set(name: str) -> tuple[str, ...]:
    """One named set; open_clip (a slow import) is imported only for its own two sets."""
    if name == "industrial":
        return INDUSTRIAL_TEMPLATES
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    # open_clip keeps its templates as one-argument callables; calling them with "{}" gives format strings.
    return tuple(t("{}") for t in {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}[name])


def template_sets() -> dict[str, tuple[str, ...]]:
    return {name: template_set(name) for name in TEMPLATE_SETS}


_PLACEHOLDER = re.compile(r"\{(c|name|class|classname)?\}")


def resolve_templates(items: Sequence[str] | None) -> list[str]:
    """Named sets and literal templates -> a de-duplicated list of format strings with one ``{}``."""
    items = list(items) if items else [DEFAULT_TEMPLATE_SET]
    out: list[str] = []
    for item in items:
        if item in TEMPLATE_SETS:
            out.extend(template_set(item))
            continue
        if not _PLACEHOLDER.search(item):
            raise PromptError(
                f"template '{item}' is neither a named set ({', '.join(TEMPLATE_SETS)}) nor a string with '{{}}' for "
                "the class"
            )
        literal = _PLACEHOLDER.sub("{}", item.replace("{{", "\x00").replace("}}", "\x01"))
        literal = literal.replace("\x00", "{{").replace("\x01", "}}")
        try:
            literal.format("class")
        except (KeyError, IndexError, ValueError) as err:
            raise PromptError(f"template '{item}': use {{}} for the class name and nothing else in braces "
                              f"({type(err).__name__}: {err}); write {{{{ and }}}} for literal braces") from None
        out.append(literal)
    return list(dict.fromkeys(out))


def parse_class_names(text: str) -> list[ClassSpec]:
    names = [n.strip() for n in text.split(",")]
    if len(names) > 1 and not names[-1]:
        names = names[:-1]  # a trailing comma
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise PromptError(f"--classes '{text}': class name {empty[0]} is empty")
    return check_classes([ClassSpec(n) for n in names], source="--classes")


def _as_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PromptError(f"{where}: expected a string or a list of strings")


def load_class_file(path: str | Path) -> list[ClassSpec]:
    """Read classes from YAML or JSON. Accepted shapes::

        classes: [ok, scratch]                       # or a bare list
        classes:                                     # or a bare mapping
          scratch: {synonyms: [scuff], descriptions: ["a thin bright line across the surface"]}
          ok: "a clean surface with no defects"     # a string is a description
        classes: [{name: scratch, synonyms: [...], descriptions: [...]}]
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PromptError(f"{path}: cannot read classes file ({err.strerror or err})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PromptError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({first})") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    specs: list[ClassSpec] = []
    if isinstance(data, list):
        for i, item in enumerate(data):
            where = f"{path}: classes[{i}]"
            if isinstance(item, str):
                specs.append(ClassSpec(item))
            elif isinstance(item, dict) and isinstance(item.get("name"), str):
                specs.append(
                    ClassSpec(
                        item["name"],
                        _as_list(item.get("synonyms"), where + ".synonyms"),
                        _as_list(item.get("descriptions", item.get("description")), where + ".descriptions"),
                    )
                )
            else:
                raise PromptError(f"{where}: expected a class name or a mapping with 'name'")
    elif isinstance(data, dict):
        for name, item in data.items():
            where = f"{path}: {name}"
            if item is None:
                specs.append(ClassSpec(str(name)))
            elif isinstance(item, str):
                specs.append(ClassSpec(str(name), descriptions=[item]))
            elif isinstance(item, dict):
                specs.append(
                    ClassSpec(
                        str(name),
                        _as_list(item.get("synonyms"), where + ".synonyms"),
                        _as_list(item.get("descriptions", item.get("description")), where + ".descriptions"),
                    )
                )
            else:
                raise PromptError(f"{where}: expected a description string or a mapping")
    else:
        raise PromptError(f"{path}: expected a list or mapping of classes")
    return check_classes(specs, source=str(path))


def check_classes(specs: list[ClassSpec], source: str) -> list[ClassSpec]:
    for i, spec in enumerate(specs):
        if not isinstance(spec.name, str) or not spec.name.strip():
            raise PromptError(f"{source}: class {i + 1} has an empty name")
        if spec.name != spec.name.strip():
            raise PromptError(f"{source}: class name '{spec.name}' starts or ends with spaces")
    if len(specs) < 2:
        raise PromptError(f"{source}: at least two classes are needed, got {len(specs)}")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PromptError(f"{source}: duplicate class names: {', '.join(dupes)}")
    return specs
