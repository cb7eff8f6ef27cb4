"""One module per phase of a GRPO step, as tensor math (no transformers): scoring, rollout filters,
advantages, importance weights and metrics. Sampling lives in zenalign.generation, the log-prob
passes with the model code (zenalign.models.logprobs)."""
