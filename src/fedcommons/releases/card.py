"""A model card per release, built with ``huggingface_hub``'s ``ModelCard``.

YAML metadata (license, library, tags, base model, ``model-index`` results) and the
sections of Mitchell et al. (2019), "Model Cards for Model Reporting": model details,
intended use, factors, metrics, evaluation data, training data (a summary only: nothing
about any institution's data leaves it), privacy guarantee, caveats. The card is
rendered locally from a template string: nothing touches the network.
"""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fedcommons.privacy.line import model_card_section
from fedcommons.wire.manifest import ReleaseManifest

CARD_FILE = "README.md"

_TEMPLATE = """---
{{ card_data }}
---

# {{ name }} {{ version }}

A community release of the **{{ name }}** line, trained with federated learning by
fedcommons: {{ contributors }} contributing institution(s) trained on data that never left
them; the coordinator merged their updates with `{{ strategy }}` over {{ rounds }} round(s).

## Model details

| | |
| --- | --- |
| version | {{ version }} ({{ bump }}) |
| parent | {{ parent }} |
| created | {{ created }} |
| task | `{{ task }}` |
| parameters | {{ num_parameters }} |
| weights | `{{ weights_sha256 }}` (safetensors, {{ weights_bytes }} bytes) |
| strategy | `{{ strategy }}` {{ strategy_params }} |
| aggregated by | {{ strategy_code }} |
| code version | fedcommons {{ code_version }} |
| signed by | Ed25519 key `{{ key_id }}` |

Version bump: {{ bump_reasons }}
{{ base_section }}

## Intended use

{{ intended_use }}

## Factors

Evaluated per class as well as overall: the suite's worst-class metric bounds how much any
single group (class) may degrade between releases. Institutions differ in their label
mix (non-IID data); the release is only as representative as its contributors.

## Metrics

Validation suite `{{ suite }}` (target policy `{{ target_policy }}`), on {{ device }},
against the parent {{ parent_source }}:

| task | metric | direction | tolerance | value | parent | verdict |
| --- | --- | --- | --- | --- | --- | --- |
{{ metric_rows }}

Test split: {{ test_metrics }}

## Evaluation data

{{ evaluation_data }}

## Training data

Private data held by {{ contributors }} institution(s); it never left them and is not
described here beyond: total examples seen per round {{ examples }}, compression of the
uploaded updates `{{ compression }}`, total upload {{ upload_bytes }} bytes.

{{ privacy }}
## Caveats and recommendations

- Scores are on the validation suite above only; check the model on your own data.
- A federated model reflects the institutions that contributed; groups they lack are
  under-represented.
- Verify the release before use: `fedcommons release verify {{ version }}`.
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _code_text(code: dict[str, Any]) -> str:
    """``pkg 1.2 (plugin, `mod:fn`)`` from a manifest's ``strategy_code``."""
    if not code:
        return "-"
    package = " ".join(str(code[k]) for k in ("package", "version") if code.get(k))
    return (
        f"{package or 'unpackaged code'} ({code.get('origin', '?')}, `{code.get('object', '?')}`)"
    )


def render_card(manifest: ReleaseManifest, *, license: str = "apache-2.0") -> str:
    """The card's text (Markdown with YAML front matter) for ``manifest``."""
    validation = manifest.validation or {}
    tasks = validation.get("tasks", [])
    eval_results = [
        EvalResult(
            task_type="classification",
            dataset_type=t["dataset"],
            dataset_name=t["dataset"],
            dataset_split="validation",
            metric_type=t["metric"],
            metric_name=t["name"],
            metric_value=float(t["candidate"]),
        )
        for t in tasks
        if t.get("candidate") is not None and t["candidate"] == t["candidate"]
    ]
    base_model = f"{manifest.name}@{manifest.parent_version}" if manifest.parent_version else None
    # validation/test sets by name ("digits/validation" -> "digits"); the institutions'
    # training data is private and listed nowhere
    datasets = sorted({str(t["dataset"]).split("/")[0] for t in tasks} | {manifest.task})
    if manifest.base:
        base_model = manifest.base.get("name") or base_model
    data = ModelCardData(
        license=license,
        datasets=datasets,
        library_name="pytorch",
        tags=["fedcommons", "federated-learning", manifest.task, f"strategy-{manifest.strategy}"],
        base_model=base_model,
        model_name=f"{manifest.name}-{manifest.version}",
        eval_results=eval_results or None,
        fedcommons={
            "name": manifest.name,
            "version": manifest.version,
            "weights_sha256": manifest.weights_sha256,
            "parent_manifest_sha256": manifest.parent_manifest_sha256,
        },
    )
    rows = (
        "\n".join(
            f"| {t['name']} | {t['metric']} | {t['direction']} | {t['tolerance']} | "
            f"{_fmt(t['candidate'])} | {_fmt(t['parent'])} | "
            f"{'pass' if t['passed'] else 'FAIL'}: {t['reason']} |"
            for t in tasks
        )
        or "| (no validation tasks) | | | | | | |"
    )
    fingerprints = manifest.data_fingerprints or {}
    evaluation_data = (
        "\n".join(f"- `{name}`: SHA-256 `{sha}`" for name, sha in sorted(fingerprints.items()))
        or "No validation data."
    )
    bump = manifest.version_bump or {}
    reasons = "; ".join(bump.get("reasons", [])) or "-"
    if bump.get("override_reason"):
        reasons += f" — operator override to {bump.get('bump')}: {bump['override_reason']}"
    privacy_text = model_card_section(manifest.privacy or {})
    dp_line = bool((manifest.privacy or {}).get("central"))
    examples = sorted({int(r.get("examples", 0)) for r in manifest.round_metrics}) or ["-"]
    contributors: object = manifest.contributors
    if dp_line:  # un-noised counts of who took part are not published on a DP line
        contributors = "an undisclosed number of (DP line)"
        examples = ["not published (DP line)"]
    test = {k: round(v, 4) for k, v in manifest.metrics.items() if k.startswith("test_")}
    card = ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        name=manifest.name,
        version=manifest.version,
        bump=bump.get("bump", "-"),
        bump_reasons=reasons,
        parent=manifest.parent_version or "none (first release of a major line)",
        created=manifest.created,
        task=manifest.task,
        num_parameters=manifest.num_parameters,
        weights_sha256=manifest.weights_sha256,
        weights_bytes=manifest.weights_bytes,
        strategy=manifest.strategy,
        strategy_params=json.dumps(manifest.strategy_params, sort_keys=True),
        strategy_code=_code_text(manifest.strategy_code),
        code_version=manifest.code_version,
        key_id=(manifest.signing_key_id or "-")[:16],
        contributors=contributors,
        rounds=manifest.rounds,
        intended_use=(
            f"Research and downstream fine-tuning on the `{manifest.task}` task. Not validated "
            "for decisions about individuals; not for uses outside the task's domain."
        ),
        suite=validation.get("suite", "-"),
        target_policy=validation.get("target_policy", "-"),
        device=validation.get("device", "-"),
        parent_source=f"({validation.get('parent_source', 'none')})",
        metric_rows=rows,
        test_metrics=json.dumps(test, sort_keys=True) if test else "-",
        evaluation_data=evaluation_data,
        examples=", ".join(str(e) for e in examples),
        compression=manifest.compression,
        upload_bytes=manifest.upload_bytes,
        privacy=privacy_text,
        base_section=_base_section(manifest),
    )
    return str(card)


def _base_section(manifest: ReleaseManifest) -> str:
    """A patch release's base, adapter and how to load it (empty for whole models)."""
    base = manifest.base or {}
    if not base:
        return ""
    adapter = base.get("adapter", "-")
    lora = base.get("lora")
    config = json.dumps(lora, sort_keys=True) if lora else "-"
    labels = ", ".join(base.get("label_names", [])) or "-"
    return f"""
### Patch of a pinned base

This release is a **patch** ({adapter}) of a pretrained base that it does not contain:
the registry stores only the {manifest.num_parameters} patch parameters.

| | |
| --- | --- |
| base model | `{base.get("name", "-")}` |
| base weights SHA-256 | `{base.get("sha256", "-")}` |
| adapter | `{adapter}` |
| adapter config | {config} |
| dataset | {base.get("dataset", "-")} |
| labels | {labels} |
| max tokens | {base.get("max_length", "-")} |

Load it with `fedcommons release export {manifest.version} --format peft -o DIR` (LoRA:
`PeftModel.from_pretrained(base, DIR)`) or `--format hf` (merged `transformers` folder).
"""
