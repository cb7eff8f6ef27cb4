"""Every way a completion is produced, and what it needs: zenalign's own token loop (decode), the
keyed Gumbel sampler (gumbel), group sampling on the lean forward or transformers' forward and
``generate`` (rollout), a colocated vLLM engine (vllm_engine), and the Generator that picks among
them for a run and keeps vLLM's weights in step with the policy (generator)."""
