"""``EKDLoss``: the drop-in nn.Module, holding the EMA thresholds as buffers."""

from __future__ import annotations

import copy
import enum
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from ._buffers import checkpoint_layout_problems, keep_precision_under_16_bit_casts, keep_precision_under_assign
from .backends import check_backend_name, preload
from .config import DEFAULT_FPRS, EKDConfig
from .functional import ekd_loss, initial_thresholds
from .result import EKDStats
from .validation import check_generator, refuse_stateful_recomputation

_THRESHOLD_BUFFERS = ("student_thresholds", "teacher_thresholds")
_EXTRA_STATE = "_extra_state"


class _Sharding(enum.Enum):
    """The default of ``EKDLoss(process_group=...)``: one process. (None is not that default:
    ``dist.group.WORLD`` reads None until ``init_process_group``, so a module built before it
    would silently compute per-rank losses; None means the default group, as in torch.distributed.)
    An enum member, so that copies and pickles keep the one instance and Dynamo takes it as a
    constant: a module built inside a ``torch.compile(fullgraph=True)`` function compiles (an
    instance of a plain class stopped Dynamo there)."""

    NOT_SHARDED = "one process"

    def __repr__(self) -> str:
        return "<no process group: one process>"


_NOT_SHARDED = _Sharding.NOT_SHARDED


def _is_non_group_member(process_group, dist) -> bool:
    """Whether it is GroupMember.NON_GROUP_MEMBER (an int in recent releases: compared by value,
    a bool excluded)."""
    marker = getattr(dist.GroupMember, "NON_GROUP_MEMBER", None)
    return marker is not None and (process_group is marker or (type(process_group) is int and process_group == marker))


def _check_process_group(process_group, backend: str) -> None:
    """ValueError, when the module is built, for a process_group that is not a group (a string
    such as "world" failed only at the first call, deep inside torch.distributed) and for a
    backend named with one (the sharded loss computes its share with PyTorch ops, whatever the
    backend: the argument would do nothing)."""
    if process_group is _NOT_SHARDED:
        return
    if backend != "auto":
        raise ValueError(f"backend={backend!r} with process_group: the sharded loss computes its share of the "
                         "pairs with PyTorch ops (ekd_kernels.distributed), whatever the backend; leave backend "
                         "at 'auto', or drop process_group for a single-process loss on that backend")
    if process_group is None:
        return
    import torch.distributed as dist

    # (dist.new_group returns GroupMember.NON_GROUP_MEMBER on the ranks outside the group: code
    # that builds the loss on every rank and calls it on the members only stays valid)
    if dist.is_available() and (isinstance(process_group, dist.ProcessGroup)
                                or _is_non_group_member(process_group, dist)):
        return
    raise ValueError("process_group must be a torch.distributed process group (dist.group.WORLD, or one made "
                     f"by dist.new_group) or None for the default group, got {process_group!r} "
                     f"({type(process_group).__name__})")


class EKDLoss(nn.Module):
    """Evaluation-oriented Knowledge Distillation loss (Huang et al., CVPR 2022).

    ``EKDLoss()`` has the authors' defaults and reproduces their implementation; every option
    is described in ``EKDConfig`` and SPEC.md.

    Buffers (saved in ``state_dict``): ``student_thresholds`` and ``teacher_thresholds``, the K
    EMA thresholds in FPR order (1e-1 first). They update in training mode (the default) and
    stay frozen in ``eval()`` mode; casts to 16 bits (``.half()``, ``.bfloat16()``, say with the
    model the loss sits in) leave them in fp32, where the EMA does not stall.  The state_dict
    also holds the FPRs (a checkpoint of other FPRs is refused) and the state of the module's
    own ``generator``, so that resuming continues the same random draws.  ``last_stats`` holds the
    ``EKDStats`` of the last call.

    ``process_group``: compute the loss of the global batch (every rank's rows concatenated)
    sharded over the ranks of this torch.distributed group; each rank passes its own rows
    (see ``ekd_kernels.distributed`` for the gradient convention). ``None`` or
    ``dist.group.WORLD`` (which is None until ``init_process_group``) is the default group,
    resolved at each call, so the module may be built before torch.distributed is initialised;
    a call before it raises a ``RuntimeError``. Without the argument the loss is single-process.
    Every call checks that the ranks agree (options, train/eval mode, threshold state, embedding
    widths and dtypes, whether each rank's input passed its checks) and raises the same
    ``ValueError`` on every rank when they do not.

    Example::

        crit = EKDLoss().to(device)
        loss = arcface_loss + crit(student_emb, teacher_emb, labels)
    """

    def __init__(self, fprs: Sequence[float] = DEFAULT_FPRS, temperature: float = 0.01,
                 num_hard_negatives: int = 2000, momentum: float = 0.01, positive_weight: float = 0.02,
                 negative_weight: float = 0.01, critical_only: bool = False, rank_loss: str = "soft_rank",
                 negative_selection: str = "hardest", compute_critical_ratio: bool = False,
                 backend: str = "auto", generator: Optional[torch.Generator] = None, process_group=_NOT_SHARDED):
        super().__init__()
        self.config = EKDConfig(fprs=fprs, temperature=temperature, num_hard_negatives=num_hard_negatives,
                                momentum=momentum, positive_weight=positive_weight,
                                negative_weight=negative_weight, critical_only=critical_only,
                                rank_loss=rank_loss, negative_selection=negative_selection,
                                compute_critical_ratio=compute_critical_ratio)
        check_backend_name(backend)
        check_generator(generator)
        _check_process_group(process_group, backend)
        preload(backend)
        self.backend = backend
        self.generator = generator
        # Sharded across the ranks of this group (ekd_kernels.distributed; None: the default group,
        # resolved at each call); _NOT_SHARDED (the default): one process.
        self.process_group = process_group
        self.register_buffer("student_thresholds", initial_thresholds(self.config))
        self.register_buffer("teacher_thresholds", initial_thresholds(self.config))
        self.last_stats: Optional[EKDStats] = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to the state of a new module: both thresholds at their initial value (zeros, as the
        authors initialise them), in place (the buffers keep their device, dtype and identity), and
        no ``last_stats``.  Why: a module built on the meta device (``with torch.device("meta")``,
        FSDP's deferred initialisation) and materialised by ``to_empty`` holds uninitialised
        memory in its buffers; FSDP calls ``reset_parameters`` there, and a user who calls
        ``to_empty`` by hand calls it next.  The generator, the user's object, is left as it is."""
        for name in _THRESHOLD_BUFFERS:
            getattr(self, name).zero_()
        self.last_stats = None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The loss of one batch (0-d, fp32; fp64 for fp64 inputs); updates the thresholds in
        training mode."""
        # (its backward keeps no B x B activations: nothing to gain from checkpointing it)
        # (each buffer read once: a buffer's attribute lookup goes through nn.Module.__getattr__)
        student_state, teacher_state = self.student_thresholds, self.teacher_thresholds
        # the thresholds the loss reads (copies under torch.compile: see refuse_stateful_recomputation)
        student_thresholds, teacher_thresholds = refuse_stateful_recomputation(
            self, "updates its thresholds", "checkpoint ekd_loss with explicit thresholds", student_state,
            teacher_state)
        training = self.training
        # (sharded: the same check runs inside the ranks' agreement exchange, so every rank raises)
        if self.process_group is _NOT_SHARDED and isinstance(student, torch.Tensor) \
                and student_state.device != student.device:
            raise ValueError(
                f"the EKDLoss thresholds are on {student_state.device} but the embeddings are on "
                f"{student.device}: move the loss module with .to(device)")
        if self.process_group is not _NOT_SHARDED:
            from .distributed import ekd_sharded_checked
            result = ekd_sharded_checked(student, teacher, labels, student_thresholds, teacher_thresholds,
                                         self.config, update_thresholds=training,
                                         generator=generator or self.generator, group=self.process_group)
        else:
            result = ekd_loss(student, teacher, labels, student_thresholds, teacher_thresholds,
                              update_thresholds=training, generator=generator or self.generator,
                              backend=self.backend, config=self.config)
        if training:
            with torch.no_grad():
                student_state.copy_(result.student_thresholds)
                teacher_state.copy_(result.teacher_thresholds)
        self.last_stats = result.stats
        return result.loss

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo):
        """A copy that shares the process group: a group is a handle to this process's
        communicators, not state (and cannot be copied); everything else is copied as usual."""
        group = self.process_group
        if group is not None and group is not _NOT_SHARDED:
            memo[id(group)] = group
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(nn.Module.__getstate__(self), memo))
        return copied

    def __copy__(self):
        """A shallow copy, as the default one but without __getstate__'s pickling rule below:
        it shares everything, the process group included."""
        copied = type(self).__new__(type(self))
        copied.__setstate__(nn.Module.__getstate__(self))
        return copied

    def __getstate__(self):
        """Pickling (torch.save of the module or of a model holding it): the default group,
        ``dist.group.WORLD``, is saved as None, which means the same (resolved at each call, in
        the process that loads it); another group cannot be: a TypeError (as pickle raises for
        what it cannot pickle) says what to do."""
        state = super().__getstate__()
        group = self.process_group
        if group is not None and group is not _NOT_SHARDED:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized() and group is dist.group.WORLD):
                raise TypeError(
                    "this EKDLoss computes over a torch.distributed group made by new_group() (or over a default "
                    "group since destroyed by destroy_process_group()), which cannot be pickled (a group is a "
                    "handle to this process's communicators); save its state_dict() instead, and build the loss "
                    "with the group again where you load it")
            state["process_group"] = None
        return state

    # ------------------------------------------------------------------ state
    #: 2: the state_dict holds _extra_state (FPRs, generator state); 1 (or none): thresholds only.
    _version = 2

    def get_extra_state(self) -> Dict[str, Any]:
        """What else a resumed run needs: the FPRs the thresholds belong to, and the state of the
        module's own generator (negative_selection="random")."""
        state: Dict[str, Any] = {"fprs": list(self.config.fprs)}
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        # The FPRs were compared before anything was copied (_load_from_state_dict).
        # (_checkpoint_problems tried the generator state on a scratch generator; it may come on
        # another device, e.g. torch.load(map_location="cuda"): set_state takes a CPU tensor only)
        if self.generator is not None and state.get("generator_state") is not None:
            self.generator.set_state(state["generator_state"].cpu())

    def _extra_state_problems(self, extra: Any, prefix: str) -> List[str]:
        """Why the checkpoint's extra state cannot be loaded, found before anything is copied
        (set_extra_state runs after the thresholds are: a failure there left them overwritten)."""
        name = prefix + _EXTRA_STATE
        if not isinstance(extra, dict):
            return [f"{name} must be a dict (fprs, generator_state), got {type(extra).__name__}"]
        problems = []
        if "fprs" in extra:
            try:
                fprs = tuple(float(f) for f in extra["fprs"])
            except (TypeError, ValueError):
                problems.append(f"{name}['fprs'] must be a sequence of false-positive rates, got {extra['fprs']!r}")
            else:
                if fprs != self.config.fprs:
                    problems.append(f"{prefix}student_thresholds / teacher_thresholds belong to fprs={fprs}, "
                                    f"but this EKDLoss has fprs={self.config.fprs}")
        state = extra.get("generator_state")
        if self.generator is not None and state is not None:
            try:  # the state that set_extra_state will set, tried on a scratch generator of the same kind
                if not isinstance(state, torch.Tensor) or state.is_meta:
                    raise TypeError(f"a {type(state).__name__}" + (" on the meta device" if isinstance(
                        state, torch.Tensor) else ""))
                torch.Generator(device=self.generator.device).set_state(state.cpu())
            except (TypeError, RuntimeError, ValueError) as exc:
                problems.append(f"{name}['generator_state'] is not a state of this module's generator "
                                f"({self.generator.device} generator): {str(exc).splitlines()[0]}")
        return problems

    def _checkpoint_problems(self, state_dict: Dict[str, Any], prefix: str) -> List[str]:
        """Why a checkpoint cannot be this module's state: thresholds of another shape or of a
        non-floating dtype, thresholds of other FPRs (same K would load silently) or non-finite
        ones (this module never holds them: a corrupted file), an extra state that is not one."""
        problems = checkpoint_layout_problems(self, state_dict, prefix, _THRESHOLD_BUFFERS)
        if problems:
            return problems
        if prefix + _EXTRA_STATE in state_dict:
            problems += self._extra_state_problems(state_dict[prefix + _EXTRA_STATE], prefix)
        for name in _THRESHOLD_BUFFERS:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and not value.is_meta and not torch.isfinite(value).all():
                problems.append(f"{prefix}{name} in the checkpoint is not finite ({value.tolist()}); an EKDLoss "
                                "never holds such a state (a corrupted checkpoint?)")
        return problems

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        problems = self._checkpoint_problems(state_dict, prefix)
        if problems:  # nothing is copied: the module keeps its state, load_state_dict raises
            error_msgs.extend(problems)
            return
        before = len(missing_keys)
        # (load_state_dict(assign=True) may bring 16-bit thresholds, or any layout)
        keep_precision_under_assign(self, _THRESHOLD_BUFFERS, lambda: super(EKDLoss, self)._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs))
        version = local_metadata.get("version") if local_metadata else None
        if (version is None or version < 2) and prefix + _EXTRA_STATE in missing_keys[before:]:
            missing_keys.remove(prefix + _EXTRA_STATE)  # a checkpoint from before the extra state

    def _apply(self, fn, recurse=True):
        """Casts to 16 bits leave the thresholds in fp32 (on the new device): a 16-bit EMA would
        stall (0.01 x a step is below bf16's resolution near 0.3), and rounding them would
        change the state a checkpoint resumes from.  Every other cast applies as usual."""
        return super()._apply(keep_precision_under_16_bit_casts(self, _THRESHOLD_BUFFERS, fn), recurse)

    def extra_repr(self) -> str:
        c = self.config
        return (f"fprs={c.fprs}, temperature={c.temperature}, num_hard_negatives={c.num_hard_negatives}, "
                f"momentum={c.momentum}, weights=({c.positive_weight}, {c.negative_weight}), "
                f"rank_loss={c.rank_loss!r}, critical_only={c.critical_only}, "
                f"negative_selection={c.negative_selection!r}, compute_critical_ratio={c.compute_critical_ratio}, "
                f"backend={self.backend!r}" + self._sharding_repr())

    def _sharding_repr(self) -> str:
        group = self.process_group
        if group is _NOT_SHARDED:
            return ""
        return ", sharded over the default process group" if group is None else f", sharded over {group!r}"
