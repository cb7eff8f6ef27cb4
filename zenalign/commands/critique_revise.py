"""``zenalign critique-revise RECIPE``: Constitutional AI's supervised phase.

For each prompt: the model responds; a principle is drawn; the model critiques its response by
that principle, then revises it in the light of the critique (Bai et al., arXiv 2212.08073, §3).
Two JSONL files come out:

- ``sft.jsonl``: ``{prompt, completion: revision, original, critique, principle}`` for fine-tuning;
- ``preferences.jsonl``: ``{prompt, chosen: revision, rejected: original}``, ready for
  ``zenalign train-rm`` (pairs whose revision equals the original are left out).

    model: {path: models/hhh-policy}
    data: {type: hhh}
    principles: ["decline requests to hurt or steal", "never state a wrong or made-up answer"]
    output_dir: runs/critique-revise
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field, ValidationError, create_model

from zenalign.errors import RecipeError
from zenalign.recipe.principles import load_principles
from zenalign.recipe.schema import ModelSection, SamplingSection, Section
from zenalign.recipe.loader import apply_override, read_yaml
from zenalign.recipe.messages import format_validation_error


class CritiqueRecipeBase(Section):
    """A critique-and-revise run for `zenalign critique-revise`."""

    model: ModelSection = Field(description="The model that responds, critiques and revises.")
    data: Any = Field(description="Where prompts come from: `{type: TASK, ...}`, as in a GRPO recipe.")
    principles: list[Union[str, dict[str, str]]] = Field(
        default_factory=list, description="Principles: strings or {name, text}."
    )
    principles_file: Optional[str] = Field(None, description="YAML list or text file (one per line) of principles.")
    num_prompts: int = Field(32, ge=1, description="How many training prompts to process.")
    response_template: str = Field("{prompt}", description="What the model answers: made from {prompt}.")
    critique_template: str = Field(
        "{prompt}{response}\ncritique by the principle \"{principle}\": ",
        description="Critique request made from {prompt}, {response} and {principle}.",
    )
    revision_template: str = Field(
        "{prompt}{response}\ncritique: {critique}\nrevision by the principle \"{principle}\": ",
        description="Revision request made from {prompt}, {response}, {critique} and {principle}.",
    )
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="max_new_tokens and temperature of every generation.")
    greedy: bool = Field(True, description="Decode greedily (else sample with `sampling`).")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    seed: int = Field(0, description="Seed of the prompt and principle draws.")
    output_dir: str = Field("runs/{recipe}", description="Where sft.jsonl and preferences.jsonl go.")


def load_critique_recipe(path: Path, overrides=()):
    from zenalign.plugins import collect_registry
    from zenalign.plugins import load_plugins
    from zenalign.recipe.schema import tagged_union

    data = read_yaml(path)
    for text in overrides:
        apply_override(data, text)
    load_plugins(data.get("plugins") or [], path.resolve().parent)
    data.pop("plugins", None)
    registry = collect_registry()
    model = create_model("CritiqueRecipe", __base__=CritiqueRecipeBase, data=(tagged_union("task", registry), Field(description="Prompts.")))
    try:
        return model.model_validate(data), registry
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, model, str(path), overrides)) from exc


def critique_revise(path: Path, overrides=()) -> dict[str, Any]:
    from zenalign.data import check_records, render_prompt
    from zenalign.generation.gumbel import completion_keys
    from zenalign.models.loading import eos_token_ids, load_causal_lm, load_tokenizer
    from zenalign.plugins import BuildContext
    from zenalign.recipe.schema import Recipe
    from zenalign.generation.rollout import generate_groups

    recipe, registry = load_critique_recipe(path, overrides)
    base = path.resolve().parent
    context = BuildContext(recipe=Recipe(), base_dir=base)
    principles = [p.model_dump() for p in load_principles(recipe.principles, recipe.principles_file, base)]
    records = check_records(registry.get("task", recipe.data.type).build(recipe.data, context).train_prompts(), "data")
    rng = random.Random(recipe.seed)
    records = rng.sample(records, min(recipe.num_prompts, len(records)))
    model_dir = context.resolve_path(recipe.model.path)
    model = load_causal_lm(model_dir, "model.path", recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(context.resolve_path(recipe.model.tokenizer_path or recipe.model.path), "model.path")
    eos = eos_token_ids(model, tokenizer)

    def generate(texts: list[str], step: int) -> list[str]:
        out = []
        for start in range(0, len(texts), recipe.batch_size):
            chunk = texts[start : start + recipe.batch_size]
            keys = None if recipe.greedy else completion_keys(recipe.seed, step, start, len(chunk))
            out += generate_groups(model, tokenizer, chunk, recipe.sampling, eos, 1, keys=keys).completions
        return out

    prompts = [render_prompt(r, tokenizer) for r in records]
    drawn = [rng.choice(principles) for _ in records]
    responses = generate([recipe.response_template.format(prompt=p) for p in prompts], 1)
    critiques = generate([recipe.critique_template.format(prompt=p, response=r, principle=pr["text"])
                          for p, r, pr in zip(prompts, responses, drawn)], 2)
    revisions = generate([recipe.revision_template.format(prompt=p, response=r, critique=c, principle=pr["text"])
                          for p, r, c, pr in zip(prompts, responses, critiques, drawn)], 3)
    out = Path(recipe.output_dir.replace("{recipe}", path.stem))
    out.mkdir(parents=True, exist_ok=True)
    pairs = 0
    with (out / "sft.jsonl").open("w", encoding="utf-8") as sft, (out / "preferences.jsonl").open("w", encoding="utf-8") as prefs:
        for p, r, c, v, pr in zip(prompts, responses, critiques, revisions, drawn):
            sft.write(json.dumps({"prompt": p, "completion": v, "original": r, "critique": c, "principle": pr["name"]}) + "\n")
            if v.strip() != r.strip():
                prefs.write(json.dumps({"prompt": p, "chosen": v, "rejected": r}) + "\n")
                pairs += 1
    return {"prompts": len(records), "preference_pairs": pairs, "output_dir": str(out)}
