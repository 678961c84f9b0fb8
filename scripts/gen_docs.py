#!/usr/bin/env python3
"""The documentation's reference pages, generated from the code they describe.

    reference/config.md   every setting of `FlywheelConfig` (config.py): name, type, default, bounds, description
    reference/cli.md      every `flywheel` subcommand and option, from flows/cli.py's `build_parser()`
    reference/tables.md   every table and column, from storage/schemas.py's `TABLES`

mkdocs runs this file as a hook (mkdocs.yml: `hooks:`): `on_files` adds the three pages to the site
at build time, so they always describe the code being built and are never committed. A setting's
description is its `Field(description=…)` and the comment written above it in config.py; a
column's is the comment beside or above it in storage/schemas.py. To read the pages without
building the site:

    .venv/bin/python scripts/gen_docs.py --out /tmp/reference
"""

from __future__ import annotations

import argparse
import ast
import html
import inspect
import io
import json
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

PAGES = ("reference/config.md", "reference/cli.md", "reference/tables.md")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, no pipe or angle bracket that Markdown would read."""
    text = " ".join(text.split())
    return html.escape(text, quote=False).replace("|", "&#124;")


def _code(value: str) -> str:
    """`value` as inline code inside a table cell (a pipe would end the cell even inside backticks)."""
    value = " ".join(value.split())
    if "|" in value:
        return "<code>" + html.escape(value, quote=False).replace("|", "&#124;") + "</code>"
    fence = "``" if "`" in value else "`"
    pad = " " if "`" in value else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based, within `source`) → the text of the comment on that line."""
    out: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _comment_for(lines: list[str], comments: dict[int, str], lineno: int) -> str:
    """The comment beside line `lineno`, else the block of whole-line comments right above it."""
    if lineno in comments and not lines[lineno - 1].lstrip().startswith("#"):
        return comments[lineno]
    block: list[str] = []
    i = lineno - 1
    while i >= 1 and lines[i - 1].lstrip().startswith("#"):
        block.insert(0, comments.get(i, ""))
        i -= 1
    return " ".join(block)


# ---------------------------------------------------------------------------------------------
# configuration


def _models_in(annotation: Any) -> list[type]:
    """The pydantic model classes an annotation holds (inside lists, unions, Optional, Annotated)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        for m in _models_in(arg):
            if m not in out:
                out.append(m)
    return out


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (list, tuple)


def _type_name(annotation: Any) -> str:
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [_type_name(a) for a in args]
        if len(kinds) > 2 and all(k.endswith(" source") for k in kinds):
            return "a source: " + ", ".join(k.removesuffix(" source") for k in kinds)
        return " or ".join(kinds)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "mapping"
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        kind = annotation.model_fields.get("type")
        if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
            return f"{typing.get_args(kind.annotation)[0]} source"
        return "settings"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    parts = []
    for m in field.metadata:
        for attr, sign in signs.items():
            if getattr(m, attr, None) is not None:
                parts.append(f"{sign} {getattr(m, attr)}")
        if getattr(m, "pattern", None):
            parts.append(f"matches {m.pattern}")
    return ", ".join(parts)


NESTED = "(nested settings)"


def anchor(path: str) -> str:
    """A section's id: `model.vllm` → `model-vllm`, `judge.sources[]` + type verifier → `judge-sources-verifier`."""
    return path.replace("[]", "").replace(".", "-").replace(" ", "-") or "top-level"


def _default(field) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return NESTED

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json", exclude_none=True)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return json.dumps(plain(value), ensure_ascii=False)


def _field_comments(cls: type) -> dict[str, str]:
    """Field name → the comment written above (or beside) it in the class's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    source = inspect.cleandoc("\n" + source) if source.startswith(" ") else source
    lines, comments = source.splitlines(), _comments(source)
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            # a comment's record of a past measurement ("Measured on the default run: …") describes
            # the run it came from, not the setting: the results pages hold the measurements
            out[node.target.id] = _MEASURED.sub("", _comment_for(lines, comments, node.lineno)).strip()
    return out


_MEASURED = re.compile(r"\s*Measured\b.*?\.(?=\s|$)")


# Descriptions for settings whose code carries none (neither `description=` nor a comment); the
# code's own text wins wherever it exists, so an entry here only fills a gap.
FALLBACK = {
    "rounds": "Rounds to run after round 0 (the starting model's benchmark); `--rounds` sets it. Not hashed.",
    "workspace": "The folder that holds the run's tables, catalog, checkpoints, run files and (by default) the "
    "MLflow store. Not hashed.",
    "model.dtype": "auto: bfloat16 on a GPU that supports it, float32 otherwise (the CPU).",
    "model.vllm": "Used when `engine` is vllm.",
    "model.openai": "Where the server is, for `engine: openai` (required then).",
    "model.vllm.tensor_parallel_size": "GPUs one model is split over.",
    "model.vllm.gpu_memory_utilization": "Share of each GPU's memory vLLM may take. Not hashed.",
    "model.vllm.max_model_len": "Longest sequence vLLM plans for; null: the model's own.",
    "model.vllm.enforce_eager": "Run without CUDA graphs. Not hashed.",
    "model.openai.top_logprobs": "How many top log-probs a rubric score asks for at the verdict position.",
    "task.prompts_file": "A JSONL or Parquet file with a `prompt` and an optional `answer` per row; when set, "
    "it replaces the reasoning-gym task.",
    "task.prompts_per_round": "Training prompts drawn for each round.",
    "sampling.temperature": "Sampling temperature of the generate stage.",
    "sampling.top_p": "Nucleus sampling's cumulative probability.",
    "sampling.max_new_tokens": "Longest response sampled, in tokens.",
    "judge.sources": "The reward sources, in any order; a bare name (`- verifier`) is short for `{type: verifier}`.",
    "judge.batch_size": "Candidates a model-based judge scores together. Not hashed.",
    "judge.max_prompt_tokens": "A judge prompt longer than this loses its start (never the verdict cue at its end).",
    "judge.sources[].name": "The source's name: its `source` in the judgments table, and how curation refers to it "
    "(default: its type).",
    "judge.sources[].type": "Which kind of reward source this is.",
    "judge.sources[].pattern": "match: regex: the pattern searched in the response ({answer}: the escaped reference).",
    "judge.sources[].callable": 'match: callable: "module:function", called as f(prompt, response, answer, '
    "metadata) -> float or None.",
    "judge.sources[].tolerance": "match: numeric: the largest difference still counted as equal.",
    "judge.sources[].beta": "β in β·log π_θ(y|x)/π_ref(y|x).",
    "curation.cream_source": "The LLM judge whose rankings CREAM compares (it needs previous: true).",
    "curation.cream_min_tau": "cream: skip drops the pairs of prompts whose Kendall τ is below this.",
    "curation.min_margin": "A pair's chosen reward must exceed its rejected one by at least this: ties and NULL "
    "scores are never paired.",
    "curation.pairs_per_prompt": "At most this many pairs per prompt.",
    "curation.max_pairs_per_category": "At most this many pairs per category (null: no cap).",
    "curation.decontam_threshold": "See decontam_ngram.",
    "train.lora": "Train a LoRA adapter (merged into a full checkpoint after training); false: a full fine-tune.",
    "train.lora_r": "LoRA's rank.",
    "train.lora_alpha": "LoRA's scaling α.",
    "train.lora_dropout": "LoRA's dropout.",
    "train.sft": "Any field of trl.SFTConfig, for `method: sft`; merged over these defaults.",
    "train.accelerate_config": "An Accelerate config file, or ddp, fsdp, deepspeed_zero3 (the ones shipped in "
    "configs/accelerate/): training runs as `accelerate launch`.",
    "benchmark.max_new_tokens": "Longest greedy answer, in tokens.",
    "benchmark.batch_size": "Rows decoded together in the benchmark stage (part of the config's hash: the batch's "
    "shape can change a greedy token).",
    "benchmark.guards[].task": "A reasoning-gym task name.",
    "benchmark.guards[].options": "The task's options.",
    "benchmark.guards[].size": "Items in the suite.",
    "benchmark.lm_eval.tasks": "lm-evaluation-harness task names (or tasks defined in include_path).",
    "benchmark.lm_eval.num_fewshot": "Few-shot examples; null: each task's own default.",
    "benchmark.lm_eval.batch_size": "Rows evaluated together.",
    "benchmark.lm_eval.apply_chat_template": "Render the prompts with the model's chat template.",
    "promotion.min_improvement": "The validation exact-match gain over the champion a round needs (0.02: two points).",
    "stages.retries": "Retries of a stage after a transient failure.",
    "stages.retry_delay_s": "The first retry's delay; it grows exponentially.",
    "stages.timeout_s": "A stage that runs longer fails its round.",
    "stages.generate": "Where the stage runs.",
    "stages.generate.work_pool": "A Prefect work pool's name; null: the round's own process.",
    "stages.generate.job_variables": "Overrides of the pool's job template for this stage (needs work_pool).",
    "registry.weights": "reference: the registered model points at the round's checkpoint; copy: the weights are "
    "copied into MLflow's artifact store.",
}


def config_sections() -> list[dict]:
    """The configuration as sections, depth-first in declaration order: one per settings class at
    the first path it is reached by (a class reached again, e.g. a judge's own `model`, refers to
    that section instead of repeating it). Each row: path, type, default, bounds, description."""
    from flywheel.config import FlywheelConfig

    sections: list[dict] = []
    seen: dict[type, str] = {FlywheelConfig: ""}  # class → the path of its section

    def visit(cls: type, path: str, title: str, ident: str) -> None:
        notes = _field_comments(cls)
        rows, nested = [], []
        for name, field in cls.model_fields.items():
            fpath = f"{path}.{name}" if path else name
            text = " ".join(t for t in (field.description or "", notes.get(name, "")) if t)
            if field.description and notes.get(name) and field.description in notes[name]:
                text = notes[name]
            text = text or FALLBACK.get(fpath, "")
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if extra.get("hashed", True) is False and "Not hashed" not in text:
                text += " Not hashed (speed, place or amount of work, never what a round computes)."
            elif extra.get("hashed") == "unless_default":
                text += " Hashed only when set away from its default."
            child = f"{fpath}[]" if _is_list(field.annotation) else fpath
            default = _default(field)
            for m in _models_in(field.annotation):
                if m in seen:
                    text += f" Its settings are those of [`{seen[m]}`](#{anchor(seen[m])})."
                else:
                    seen[m] = child
                    nested.append(m)
            if default == NESTED:
                default = f"[below](#{anchor(seen[_models_in(field.annotation)[0]])})"
            else:
                default = _code(default)
            rows.append(
                {
                    "path": fpath,
                    "type": _type_name(field.annotation),
                    "default": default,
                    "bounds": _bounds(field),
                    "description": text.strip(),
                }
            )
        sections.append(
            {"path": path, "title": title, "id": ident, "doc": inspect.getdoc(cls) if cls.__doc__ else "", "rows": rows}
        )
        for m in nested:
            kind = m.model_fields.get("type")
            title = seen[m]
            if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
                title += f" (type: {typing.get_args(kind.annotation)[0]})"
            visit(m, seen[m], title, anchor(seen[m] + (f" {typing.get_args(kind.annotation)[0]}" if kind else "")))

    visit(FlywheelConfig, "", "Top level", "top-level")
    return sections


def config_page() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models in `config.py` when the site is built (`scripts/gen_docs.py`).",
        "Every setting is listed by its full dotted path, as in a YAML config file or an MLflow param (`cfg.<path>`).",
        "`[]` marks the items of a list. A description is the field's own and the comment above it in `config.py`.",
        "Unknown keys are errors, and a value outside its bounds fails with a message that names the setting.",
        "",
        "See [Configuration](../configuration.md) for how a config is put together (presets, files, flags).",
        "",
    ]
    for s in config_sections():
        out.append(f"## {s['title']} {{#{s['id']}}}")
        out.append("")
        if s["doc"]:
            out.append(" ".join(s["doc"].split()))
            out.append("")
        out.append("| setting | type | default | bounds | description |")
        out.append("|---|---|---|---|---|")
        for r in s["rows"]:
            out.append(
                f"| {_code(r['path'])} | {_cell(r['type'])} | {r['default']} | {_cell(r['bounds'])} "
                f"| {_cell(r['description'])} |"
            )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# command line


def cli_commands() -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(full command, its parser, its one-line help) for every subcommand, nested ones included."""
    from flywheel.flows.cli import build_parser

    found: list[tuple[str, argparse.ArgumentParser, str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name, sub in action.choices.items():
                    found.append((f"{prefix} {name}", sub, helps.get(name, "")))
                    walk(sub, f"{prefix} {name}")

    walk(build_parser(), "flywheel")
    return found


def _argument_row(action: argparse.Action) -> str | None:
    if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
        return None
    names = ", ".join(action.option_strings) if action.option_strings else (action.metavar or action.dest)
    if action.choices is not None:
        value = " or ".join(str(c) for c in action.choices)
    elif action.nargs == 0:
        value = "(a switch)"
    else:
        value = action.metavar or action.dest.upper()
        if action.nargs in ("+", "*"):
            value += " …"
    if isinstance(action, argparse._AppendAction):
        value += " (repeatable)"
    default = ""
    if action.default not in (None, False, argparse.SUPPRESS) and action.default != []:
        default = str(action.default)
    need = "required" if action.required or not action.option_strings else ""
    return (
        f"| {_code(names)} | {_cell(value)} | {_code(default) if default else ''} | {need} "
        f"| {_cell(action.help or '')} |"
    )


def cli_page() -> str:
    from flywheel.flows.cli import build_parser

    root = build_parser()
    out = [
        "# Command-line reference",
        "",
        "Generated from `build_parser()` in `flows/cli.py` when the site is built (`scripts/gen_docs.py`).",
        f"`{root.prog}`: {root.description}",
        "",
        "An error (a bad flag, a bad config, a missing run) is reported on standard error with exit status 2.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    commands = cli_commands()
    for full, _sub, help_ in commands:
        anchor = full.replace(" ", "-")
        out.append(f"| [`{full}`](#{anchor}) | {_cell(help_)} |")
    out.append("")
    for full, sub, help_ in commands:
        anchor = full.replace(" ", "-")
        out.append(f"## `{full}` {{#{anchor}}}")
        out.append("")
        if help_:
            out.append(_cell(help_[:1].upper() + help_[1:]) + ".")
            out.append("")
        usage = " ".join(sub.format_usage().split())
        out.append("```text")
        out.append(usage)
        out.append("```")
        out.append("")
        rows = [r for a in sub._actions if (r := _argument_row(a)) is not None]
        if rows:
            out.append("| argument | value | default | | description |")
            out.append("|---|---|---|---|---|")
            out.extend(rows)
            out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# tables

# What one row of each table is (the columns' own descriptions come from storage/schemas.py).
TABLE_ROWS = {
    "prompts": "A prompt a run drew: a training prompt of a round (split `train`), a validation or test item "
    "(written with round 0), or a training prompt dropped as overlapping an evaluation item "
    "(`decontaminated`, the overlap in its metadata).",
    "candidates": "One sampled response of the round's policy to one training prompt.",
    "judgments": "One reward source's verdict on one candidate; a verdict that did not parse keeps its row, "
    "with `score` NULL and its raw text.",
    "judge_health": "One judge-health figure of one reward source in one round.",
    "pairs": "One preference pair, in TRL's `prompt`/`chosen`/`rejected` columns plus scores, margin, rule, "
    "category and lengths.",
    "sft": "One SFT example: a prompt's best sample at or above `curation.sft_threshold`.",
    "benchmarks": "One benchmark item answered greedily by one round's model, in one suite (test, validation, "
    "a guard, or an lm-evaluation-harness task).",
    "rounds": "The lineage of one round: the policy in and out, the config hash, the seed, code and package "
    "versions, the MLflow run, the registered version and the promotion decision.",
}
_KEY_COLUMNS = {
    "run_id": "the run the row belongs to (also the folder `run_id=…`)",
    "round": "the round the row belongs to (also the folder `round=…`)",
}


def _column_comments() -> dict[str, dict[str, str]]:
    """Schema variable name → column → the comment beside or above its `pa.field(…)` line."""
    from flywheel.storage import schemas

    source = Path(inspect.getsourcefile(schemas)).read_text()
    lines, comments = source.splitlines(), _comments(source)
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        cols: dict[str, str] = {}
        for call in ast.walk(node.value):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "field"
                and call.args
                and isinstance(call.args[0], ast.Constant)
            ):
                cols[call.args[0].value] = _comment_for(lines, comments, call.lineno)
        out[node.targets[0].id] = cols
    return out


def _table_comment() -> dict[str, str]:
    """Schema variable name → the comment block above its definition."""
    from flywheel.storage import schemas

    source = Path(inspect.getsourcefile(schemas)).read_text()
    lines, comments = source.splitlines(), _comments(source)
    return {
        node.targets[0].id: _comment_for(lines, comments, node.lineno)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
    }


def tables_page() -> str:
    from flywheel.storage import schemas

    names = {id(v): k for k, v in vars(schemas).items() if k.isupper()}
    cols, above = _column_comments(), _table_comment()
    out = [
        "# Tables and columns",
        "",
        "Generated from `TABLES` in `storage/schemas.py` when the site is built (`scripts/gen_docs.py`).",
        (
            "Every table is Parquet under `<workspace>/tables/<table>/run_id=…/round=…/`, one file per part, "
            "and a view of the same name in the DuckDB catalog `<workspace>/catalog.duckdb` covers every run. "
            "Every file carries its own `run_id` and `round` columns, so a file read alone is complete. "
            "A write checks the rows against the schema below: a missing column, or a NULL in a column that is "
            "not nullable, fails before the file is replaced."
        ),
        "",
        "| table | one row is |",
        "|---|---|",
    ]
    for table, schema in schemas.TABLES.items():
        row = TABLE_ROWS.get(table) or above.get(names.get(id(schema), ""), "")
        out.append(f"| [`{table}`](#{table}) | {_cell(row)} |")
    out.append("")
    for table, schema in schemas.TABLES.items():
        var = names.get(id(schema), "")
        out.append(f"## `{table}` {{#{table}}}")
        out.append("")
        intro = TABLE_ROWS.get(table) or above.get(var, "")
        if intro:
            out.append(_cell(intro))
            out.append("")
        out.append("| column | type | nullable | description |")
        out.append("|---|---|---|---|")
        for f in schema:
            note = cols.get(var, {}).get(f.name) or _KEY_COLUMNS.get(f.name, "")
            out.append(f"| {_code(f.name)} | {_cell(str(f.type))} | {'yes' if f.nullable else 'no'} | {_cell(note)} |")
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# entry points: the mkdocs hook, and the command line


def pages() -> dict[str, str]:
    return {"reference/config.md": config_page(), "reference/cli.md": cli_page(), "reference/tables.md": tables_page()}


def on_files(files, config):  # mkdocs hook
    from mkdocs.structure.files import File

    for uri, text in pages().items():
        if files.get_file_from_path(uri) is not None:
            raise SystemExit(f"docs/{uri} exists, but it is generated at build time: delete it")
        files.append(File.generated(config, uri, content=text))
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the reference pages into")
    args = ap.parse_args()
    for uri, text in pages().items():
        target = args.out / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text + "\n")
        print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
