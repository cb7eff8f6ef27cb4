"""The plugin API: what a plugin hands to zenalign (reward source, normalizer, task, policy loss,
rollout filter and environment *types*),
the protocols their instances follow, the optional capabilities the engine looks for, and the run
context plugins receive instead of the trainer.

A type is a name, a pydantic options model and a factory. A recipe entry such as
``{type: regex_match, name: format, pattern: "^\\d+$"}`` is validated against the type's
options model (merged with the common fields of its section), then the factory builds the
instance. Factories take only the arguments they name, out of ``options`` and ``context``,
the same rule pluggy applies to hook implementations.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict

from zenalign.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class Options(BaseModel):
    """Base for plugin option models: unknown keys are errors, as everywhere in a recipe."""

    model_config = ConfigDict(extra="forbid")


def valid_regex(value: Optional[str]) -> Optional[str]:
    """A field validator for a regular-expression option: ``_compiles = field_validator("pattern")(valid_regex)``.
    A pattern that does not compile is an error naming the field; None (no pattern) passes."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


@dataclass(frozen=True)
class BuildContext:
    """What a factory may need besides its options.

    ``recipe`` is the validated recipe (a ``zenalign.recipe.schema.Recipe``); ``base_dir`` is the
    directory relative paths in the recipe are resolved against (the recipe file's directory, or
    the working directory for the Python API). ``output_dir`` is the run directory when the object
    is built for a run (None for ``zenalign validate`` and outside a run) and ``rank`` this
    process's place in it: a plugin may keep files of its own in ``output_dir / "reward-cache"``
    (``*.jsonl``, one file per process), which ``--resume`` keeps and ``run.overwrite`` removes.
    The directory may not exist yet while the factory runs: open such files at the first call.

    A policy loss's factory also gets the two run settings a loss formula may need besides its own
    options: ``kl_coef``, the weight of the KL penalty (``grpo.kl_coef``, which stays in ``grpo``
    because 0 also means that no reference model is loaded), and ``max_new_tokens``
    (``sampling.max_new_tokens``, for Dr. GRPO's constant normaliser). Both are None in the context
    of every other kind of plugin.
    """

    recipe: Any
    base_dir: Path
    tokenizer: Any = None
    device: Any = None
    output_dir: Optional[Path] = None
    rank: int = 0
    kl_coef: Optional[float] = None
    max_new_tokens: Optional[int] = None

    def resolve_path(self, path: str | Path) -> Path:
        """Resolve a path from the recipe relative to the recipe's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)


@dataclass(frozen=True)
class PluginType:
    """A named, configurable kind of plugin object."""

    name: str
    options: type[BaseModel]
    factory: Callable[..., Any]
    description: str = ""
    default: bool = False  # the type a recipe gets when it leaves the section out (one per kind)

    def summary(self) -> str:
        """The description, or the first line of the factory's docstring."""
        if self.description:
            return self.description
        doc = inspect.getdoc(self.factory) or ""
        return doc.splitlines()[0] if doc else ""

    def build(self, options: BaseModel, context: BuildContext | None = None) -> Any:
        """Call the factory with the arguments it names (``options`` and/or ``context``), and check
        that what it built has what its kind needs (:func:`check_kind`)."""
        available = {"options": options, "context": context}
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):  # builtins without a signature
            return check_kind(self, self.factory(options))
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return check_kind(self, self.factory(**available))
        wanted = {k: v for k, v in available.items() if k in params}
        return check_kind(self, self.factory(**wanted))


class RewardSourceType(PluginType):
    """A reward source kind, named in a recipe's ``rewards: [{type: NAME, ...}]``."""


@dataclass(frozen=True)
class NormalizerType(PluginType):
    """An advantage normalizer kind, named in a recipe's ``normalizer: {type: NAME, ...}``.

    ``min_group_size``: the smallest ``sampling.group_size`` it works with (2 for group-relative
    advantages; 1 for one that needs no group, such as a learned critic)."""

    min_group_size: int = 2


class TaskType(PluginType):
    """A prompt source kind, named in a recipe's ``data: {type: NAME, ...}``."""


class PolicyLossType(PluginType):
    """A policy loss kind, named in a recipe's ``loss: {type: NAME, ...}``."""


class RolloutFilterType(PluginType):
    """A rollout filter kind, named in a recipe's ``filters: [{type: NAME, ...}]``."""


class EnvironmentType(PluginType):
    """An environment kind, named in a recipe's ``environment: {type: NAME, ...}``."""


@dataclass
class ScoreBatch:
    """The completions a reward source scores, ``N = prompts_per_step * group_size`` of them.

    Completions are laid out group by group: rows ``g*G .. g*G+G-1`` answer the same prompt.
    ``columns`` holds, for every completion, the other fields of its prompt record
    (for example ``answer``), so ``columns["answer"][i]`` belongs to ``completions[i]``.
    """

    prompts: list[str]
    completions: list[str]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    completion_ids: list[list[int]] = field(default_factory=list)
    # each completion's tokens that the policy sampled, its EOS excluded: ``len(completion_ids[i])``
    # for a plain completion, less the tokens a tool or an environment inserted into an episode.
    # Empty: read ``completion_ids``
    policy_lengths: list[int] = field(default_factory=list)
    group_size: int = 1
    step: int = 0
    # TRL's conversational format (a record's ``prompt`` is a list of messages): each completion's
    # prompt messages; plain reward functions then get messages, as in TRL. Empty otherwise.
    prompt_messages: list[list[dict[str, Any]]] = field(default_factory=list)
    # multi-turn episodes: the messages each episode's policy and tools wrote (assistant and tool
    # messages; ``completions`` then holds the last assistant message's text), and each episode's
    # environment object (TRL reward functions' ``environments``; None for tools only). Empty otherwise.
    completion_messages: list[list[dict[str, Any]]] = field(default_factory=list)
    environments: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.completions)


@runtime_checkable
class RewardSource(Protocol):
    """Scores completions. NaN or None means "abstain" for that completion.

    ``score`` returns one score per completion, or, for a source that produces several named
    objectives, a mapping ``{objective: scores}`` (or an ``(N, K)`` tensor in the order of the
    optional ``objectives`` attribute). An optional ``default_name`` names its objective when the
    recipe entry gives no ``name`` (otherwise the entry's type names it). An optional
    ``reads_fields`` lists the record fields it needs: completions whose records lack one (or hold
    null) are not passed to it, and abstain.
    """

    def score(self, batch: ScoreBatch) -> Any: ...


@dataclass(frozen=True)
class Objectives:
    """The objectives a normalizer combines, in the column order of the reward tensor.

    ``roles[k]`` is "reward" or "constraint"; a constraint wants the batch mean of objective k to
    be ``>=`` or ``<=`` (``directions[k]``) ``thresholds[k]``. Left empty, every objective is a reward.
    """

    names: tuple[str, ...]
    weights: "torch.Tensor"  # (K,)
    roles: tuple[str, ...] = ()
    thresholds: tuple[Optional[float], ...] = ()
    directions: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)

    def role(self, k: int) -> str:
        return self.roles[k] if self.roles else "reward"

    @property
    def reward_indices(self) -> list[int]:
        return [k for k in range(len(self.names)) if self.role(k) == "reward"]

    @property
    def constraint_indices(self) -> list[int]:
        return [k for k in range(len(self.names)) if self.role(k) == "constraint"]


@runtime_checkable
class AdvantageNormalizer(Protocol):
    """Turns rewards ``(P, G, K)`` (prompts × group × objectives, NaN = abstain) into
    advantages ``(P, G)``. It must never return NaN."""

    def __call__(self, rewards: "torch.Tensor", objectives: Objectives) -> "torch.Tensor": ...


@dataclass
class TokenLoss:
    """What a policy loss returns for a micro-batch, every field ``(N, Tc)``: the per-token loss
    (with gradient) and the detached quantities metrics are made of."""

    loss: "torch.Tensor"
    ratio: "torch.Tensor"  # pi / pi_old as the loss sees it (metrics: ratio_mean)
    clipped: "torch.Tensor"  # 1.0 where clipping changed the token's gradient (metrics: clip_frac)
    kl: "Optional[torch.Tensor]"  # the KL estimate per token, None without a reference
    policy: "Optional[torch.Tensor]" = None  # the policy-gradient part of ``loss`` (before the KL penalty);
    #                                          grpo.top_entropy_quantile masks this part only
    entropy: "Optional[torch.Tensor]" = None  # the policy's entropy per token, filled in by the engine when measured


@runtime_checkable
class PolicyLoss(Protocol):
    """Turns the update's log-probs into per-token losses, and says how they weigh into one number.

    The engine computes ``weights = token_weights(mask, num_sequences, num_tokens)`` once for the
    whole (global) batch, then for each micro-batch sums ``weights * per_token(...).loss``, so
    micro-batching never changes the loss. ``per_token`` receives ``logp``, ``old_logp`` and
    ``ref_logp`` ``(N, Tc)`` (``ref_logp`` None without a KL term), one advantage per completion
    ``(N,)``, and the completion mask ``(N, Tc)``. ``skips_zero_advantage_rows`` promises that a
    completion with advantage 0 has zero loss and gradient when pi = pi_old and there is no KL
    term, so the engine may leave it out of the update (``engine.skip_zero_advantage``).
    """

    skips_zero_advantage_rows: bool

    def token_weights(self, mask: "torch.Tensor", num_sequences: Optional[int] = None,
                      num_tokens: Optional[float] = None) -> "torch.Tensor": ...

    def per_token(self, logp: "torch.Tensor", old_logp: "torch.Tensor", advantages: "torch.Tensor",
                  ref_logp: "Optional[torch.Tensor]" = None, mask: "Optional[torch.Tensor]" = None) -> TokenLoss: ...


@dataclass
class RolloutGroups:
    """A step's scored groups as rollout filters see them: the global batch (every process sees
    the same), ``P`` groups of ``G`` completions, between scoring and normalizing.

    A filter returns it changed (``dataclasses.replace``): it may reshape ``rewards`` (reward
    shaping; NaN stays an abstention), drop groups (``keep`` False: they never reach the loss), or
    take completions out of the loss (``loss_mask`` False). The rest is read-only.
    """

    rewards: "torch.Tensor"  # (P, G, K) float64, NaN = abstain
    keep: "torch.Tensor"  # (P,) bool: groups that go to the update
    loss_mask: "torch.Tensor"  # (P, G) bool: completions whose tokens count in the loss
    lengths: "torch.Tensor"  # (P, G) the tokens the policy sampled, with the EOS (max_new_tokens when truncated)
    truncated: "torch.Tensor"  # (P, G) bool: no EOS within max_new_tokens
    prompts: list[str]  # (P,) rendered prompts
    completions: list[list[str]]  # (P, G) decoded completions
    records: list[dict[str, Any]]  # (P,) the prompt records (with fields such as ``answer``)
    max_new_tokens: int
    step: int

    def __len__(self) -> int:
        return len(self.prompts)


@runtime_checkable
class RolloutFilter(Protocol):
    """Changes a step's scored groups before advantages are computed (see :class:`RolloutGroups`).
    Filters run in the order the recipe lists them."""

    def __call__(self, groups: RolloutGroups, objectives: Objectives) -> RolloutGroups: ...


@runtime_checkable
class Task(Protocol):
    """A source of prompt records: dicts with a ``prompt`` string and any other fields."""

    def train_prompts(self) -> list[dict[str, Any]]: ...

    def eval_prompts(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class Environment(Protocol):
    """What an environment plugin builds: a source of episodes, one per rollout (docs/agents.md).

    ``new_episode()`` returns a fresh object in the shape of TRL's ``environment_factory``
    products: ``reset(**record)`` (called with every field of the prompt record) returns None or
    text appended to the last user message; its other public methods are the tools the policy may
    call (type hints and a Google-style docstring give their schema); an optional ``get_reward()``
    scores the finished episode as one more objective, named after the environment. It may return
    None for an environment that is only the recipe's tools (``python_tools``). zenalign makes one
    episode first, at build time, to check it.
    """

    def new_episode(self) -> Any: ...


# ----------------------------------------------------------------------------------------------
# The run context: what a plugin may know about and do to the run (never the trainer itself)


@runtime_checkable
class RunContext(Protocol):
    """What a running training step offers plugins (``ObservesScores.on_scored`` and the event
    hooks): where the run is, this process's place in it, the collectives to agree across
    processes, and the one action a plugin may take on the run.

    ``step`` is the current training step (0 before the first); ``seed`` the recipe's
    ``run.seed``; ``rank`` and ``world_size`` this process's place (0 and 1 on one process);
    ``is_main`` whether this process writes the run directory; ``output_dir`` the run directory;
    ``run_id`` the run's id (zenalign-run.json: the same for every attempt of a run, resumed or
    not, and new when the run is replaced; what an experiment tracker resumes by); ``recipe`` the
    resolved recipe as plain data (what recipe.yaml holds; do not modify it).
    """

    step: int
    seed: int
    rank: int
    world_size: int
    is_main: bool
    output_dir: Path
    run_id: str
    recipe: dict[str, Any]

    def gather_objects(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank (every rank must call it)."""
        ...

    def gather_rows(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """Equal-shaped tensors from every rank, concatenated along dim 0 in rank order."""
        ...

    def reset_reference_to_policy(self) -> None:
        """Make the KL reference a copy of the current policy (a no-op without a KL term);
        checkpoints then carry the reference weights."""
        ...


# ----------------------------------------------------------------------------------------------
# Optional capabilities: a reward source or normalizer has one by defining its methods. The
# engine tests for them with isinstance, never hasattr.


@runtime_checkable
class Stateful(Protocol):
    """Kept in checkpoints as JSON + safetensors: ``state_dict()`` returns plain values and tensors
    (tensors go to safetensors, the rest to JSON); ``load_state_dict(state)`` restores them on resume."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class StatefulDirectory(Protocol):
    """Kept in checkpoints as files of its own (a model, a replay buffer): ``save_state(directory)``
    writes into an empty directory, ``load_state(directory)`` reads it back on resume. Takes
    precedence over :class:`Stateful` when an object has both."""

    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...


@runtime_checkable
class ReportsMetrics(Protocol):
    """``metrics()`` returns numbers added to each step's metrics.jsonl line: a normalizer's as they
    are, a reward source's prefixed with its objective name (``<name>/<key>``)."""

    def metrics(self) -> dict[str, float]: ...


@runtime_checkable
class ObservesScores(Protocol):
    """A reward source told of every training batch it scored, on every process:
    ``on_scored(batch, rewards, objectives, context)`` with this process's ``(N_local, K)`` rewards
    and the run's :class:`RunContext` (e.g. a reward model refreshed online from the policy's samples).
    Called once the step's batch is complete (every refill round scored and filtered), once per
    round, so every round of a step is scored by the same source state, and a step that failed
    before (and is drawn again on resume) was never observed."""

    def on_scored(self, batch: ScoreBatch, rewards: "torch.Tensor", objectives: Objectives,
                  context: RunContext) -> None: ...


@runtime_checkable
class EnforcesConstraints(Protocol):
    """A normalizer that enforces the recipe's ``role: constraint`` objectives itself (e.g. with
    Lagrange multipliers) sets ``enforces_constraints = True``. Without one, constraint objectives
    are combined as weighted rewards, with a warning at the start of the run."""

    enforces_constraints: bool


@dataclass
class TokenBatch:
    """This process's completions token by token, for a normalizer that learns values
    (:class:`LearnsValues`): every field ``(N, Tc)`` but ``sequences`` and ``attention_mask``
    ``(N, Tp + Tc)`` (left-padded prompt, right-padded completion) and ``prompt_length`` Tp."""

    sequences: "torch.Tensor"
    attention_mask: "torch.Tensor"
    prompt_length: int
    completion_mask: "torch.Tensor"  # 1 for the policy's tokens that count in the loss (0: padding, inserted tokens)
    logp: "torch.Tensor"  # log pi_old of each sampled token (detached)
    ref_logp: "Optional[torch.Tensor]"  # log pi_ref of each sampled token; None without a reference


@runtime_checkable
class Critic(Protocol):
    """An advantage estimator with a learned critic (PPO): it gives every completion token its own
    advantage. It goes in the recipe's ``normalizer`` section in place of an advantage normalizer
    (a :class:`NormalizerType` whose factory builds a critic), and needs no ``__call__``.

    ``reference_kl_coef`` > 0 asks for the reference model's log-probs (``TokenBatch.ref_logp``), for a
    KL penalty folded into the reward. Each step the engine calls ``token_advantages(tokens, rewards,
    objectives, context)`` with this process's rows of the ``(N_local, K)`` rewards and expects
    ``(N_local, Tc)`` advantages; after the policy update it calls ``train_critic(tokens, context)``
    on the same batch. Every process calls both (collectives are allowed)."""

    reference_kl_coef: float

    def token_advantages(self, tokens: TokenBatch, rewards: "torch.Tensor", objectives: Objectives,
                         context: RunContext) -> "torch.Tensor": ...

    def train_critic(self, tokens: TokenBatch, context: RunContext) -> None: ...


LearnsValues = Critic  # its name in zenalign 0.1


@runtime_checkable
class RefillsGroups(Protocol):
    """A rollout filter that wants its dropped groups replaced: while fewer than
    ``grpo.prompts_per_step`` groups are kept, the engine draws and samples that many more prompts,
    at most ``max_extra_rounds`` times per step (DAPO's dynamic sampling)."""

    max_extra_rounds: int


@runtime_checkable
class NamesObjectives(Protocol):
    """A reward source (or reward function) that scores several objectives names them in
    ``objectives``, and returns ``{name: scores}`` or an ``(N, K)`` tensor in that order. Without it
    a source is one objective, named after its recipe entry."""

    objectives: Sequence[str]


@runtime_checkable
class NamesItself(Protocol):
    """A reward source that names its objective when its recipe entry gives no ``name`` sets
    ``default_name`` (a reward function: the function's name, as the Python API names it; None:
    the entry's type)."""

    default_name: Optional[str]


@runtime_checkable
class ReadsFields(Protocol):
    """A reward source that reads prompt-record fields names them in ``reads_fields``: ``validate``
    and ``run`` then count the training records that lack them (the source abstains there)."""

    reads_fields: Sequence[str]


@runtime_checkable
class SequenceAdvantagesOnly(Protocol):
    """A policy loss that takes one advantage per completion only (GSPO's sequence ratio) sets
    ``takes_token_advantages = False``; a critic's per-token advantages are then refused at the
    start of the run. Without it a loss takes either."""

    takes_token_advantages: bool


def enforces_constraints(normalizer: Any) -> bool:
    """Whether ``normalizer`` declares :class:`EnforcesConstraints` and has it switched on."""
    return isinstance(normalizer, EnforcesConstraints) and bool(normalizer.enforces_constraints)


def takes_token_advantages(loss: Any) -> bool:
    """Whether a policy loss accepts ``(N, Tc)`` advantages (see :class:`SequenceAdvantagesOnly`)."""
    return not isinstance(loss, SequenceAdvantagesOnly) or bool(loss.takes_token_advantages)


def objective_names(source: Any) -> list[str]:
    """The objectives a reward source declares (:class:`NamesObjectives`); empty when it declares none."""
    return list(source.objectives or ()) if isinstance(source, NamesObjectives) else []


def default_name(source: Any) -> Optional[str]:
    """The objective name a reward source gives itself (:class:`NamesItself`), or None."""
    return source.default_name if isinstance(source, NamesItself) else None


def fields_read(source: Any) -> tuple[str, ...]:
    """The record fields a reward source reads (:class:`ReadsFields`); empty when it does not say."""
    return tuple(source.reads_fields or ()) if isinstance(source, ReadsFields) else ()


CAPABILITIES = (Stateful, StatefulDirectory, ReportsMetrics, ObservesScores, EnforcesConstraints, RefillsGroups,
                Critic, NamesObjectives, NamesItself, ReadsFields, SequenceAdvantagesOnly)


# ----------------------------------------------------------------------------------------------
# What each kind's objects must have: a built object satisfies one of its kind's protocols.

KIND_PROTOCOLS: dict[type, tuple[type, ...]] = {
    RewardSourceType: (RewardSource,),
    NormalizerType: (AdvantageNormalizer, Critic),
    TaskType: (Task,),
    PolicyLossType: (PolicyLoss,),
    RolloutFilterType: (RolloutFilter,),
    EnvironmentType: (Environment,),
}
_NEEDS = {
    RewardSource: "score(batch)",
    AdvantageNormalizer: "__call__(rewards, objectives)",
    Critic: "token_advantages(tokens, rewards, objectives, context), train_critic(tokens, context) and "
            "reference_kl_coef",
    Task: "train_prompts() and eval_prompts()",
    PolicyLoss: "per_token(logp, old_logp, advantages, ref_logp, mask), token_weights(mask, ...) and "
                "skips_zero_advantage_rows",
    RolloutFilter: "__call__(groups, objectives)",
    Environment: "new_episode()",
}


def protocol_members(protocol: type) -> list[str]:
    """The methods and attributes a protocol declares (its own and its protocol bases')."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        declared = list(cls.__dict__.get("__annotations__", {}))
        declared += [n for n, v in cls.__dict__.items() if callable(v) and (not n.startswith("_") or n == "__call__")]
        names += [n for n in declared if n not in names]
    return names


def check_kind(plugin_type: PluginType, obj: Any) -> Any:
    """``obj`` if it has what ``plugin_type``'s kind needs, else a one-line :class:`PluginError`
    naming what is missing (the caller adds the recipe entry)."""
    protocols = next((p for cls, p in KIND_PROTOCOLS.items() if isinstance(plugin_type, cls)), ())
    if not protocols or any(isinstance(obj, protocol) for protocol in protocols):
        return obj
    missing = {protocol: [n for n in protocol_members(protocol) if not hasattr(obj, n)] for protocol in protocols}
    closest = min(protocols, key=lambda protocol: len(missing[protocol]))
    needs = " or ".join(_NEEDS[protocol] for protocol in protocols)
    raise PluginError(f"type '{plugin_type.name}' built a {type(obj).__name__} without {', '.join(missing[closest])}; "
                      f"it needs {needs}")
