"""One module per phase of a GRPO step: rollout (sampling groups, the Gumbel sampler), scoring,
advantages, log-probs, the loss, and metrics."""
