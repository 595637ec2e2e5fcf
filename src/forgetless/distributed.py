"""Multi-process training: who am I, how many are we, and the few collectives forgetless needs.

`torchrun --nproc_per_node N -m forgetless train RECIPE` and `accelerate launch ... -m forgetless train
RECIPE` start N copies of the same run. The Trainer (through accelerate) does the data-parallel part:
it wraps the model in DDP (or FSDP / DeepSpeed), shards every batch across the processes and averages
the gradients. What forgetless adds on top must agree across processes, and these helpers are how:

- `rank()`, `world_size()`, `is_main()`: 0 / 1 / True in a single process;
- `on_main(fn)`: run `fn` on rank 0 only and hand its result (or its error) to every rank;
- `broadcast_object`, `broadcast_tensors_`, `all_reduce_sum_`, `barrier`, `main_first`, `check_same`;
- `engine(recipe)`, `trainer_options(recipe)`, `check_recipe(recipe)`: which engine runs the job (train.distributed
  or the engine `accelerate launch --config_file` selected), its TrainingArguments options, and the recipe
  options that engine cannot honour yet.

Every helper is a no-op (or the identity) when torch.distributed is not initialised, so single-process
runs take exactly the code path they always did.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import torch

from .config import DeepSpeedOptions, FsdpOptions
from .errors import ForgetlessError, RecipeError

T = TypeVar("T")


# ---------------------------------------------------------------- process group


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(cpu: bool, use_deepspeed: bool = False) -> None:
    """Start the process group through accelerate's PartialState when launched with several processes
    (gloo on CPU, nccl on CUDA), before anything rank-dependent happens. The Trainer's own PartialState
    later finds the group initialised and reuses it. No-op in a single process or when already started."""
    if not launched() or active():
        return
    from accelerate import PartialState

    # As TrainingArguments does for DeepSpeed: the flag makes accelerate start the group through deepspeed.comm.
    flag = "ACCELERATE_USE_DEEPSPEED"
    old = os.environ.get(flag)
    if use_deepspeed:
        os.environ[flag] = "true"
    try:
        PartialState(cpu=cpu)
    finally:
        if use_deepspeed:
            if old is None:
                os.environ.pop(flag, None)
            else:
                os.environ[flag] = old
    atexit.register(shutdown)


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP2 over gloo on CPUs. accelerate 1.16 switches its state to FSDP only inside the
    branch for multi-GPU-like devices (accelerate/state.py, AcceleratorState.__init__: `elif self.distributed_type
    in [MULTI_GPU, ...]`); on CPUs the state stays MULTI_CPU, the FSDP plugin is dropped without a word and the
    Trainer wraps the model in DDP. This makes the same switch for MULTI_CPU when an FSDP plugin is given (the
    Trainer passes one for `fsdp: true`); nothing else changes. Idempotent; a no-op where accelerate already
    switched (a later version that handles CPUs)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "_forgetless_cpu_fsdp", False):
        return

    def patched(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    patched._forgetless_cpu_fsdp = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = patched  # type: ignore[method-assign]


def shutdown() -> None:
    if active():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def device(default: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK when distributed on GPUs, else `default`."""
    if active() and default.type == "cuda":
        from accelerate import PartialState

        return PartialState().device
    return default


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


# ---------------------------------------------------------------- collectives


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (pickled); the identity in a single process."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return cast(T, box[0])  # rank src's obj, now on every rank


def broadcast_tensors_(tensors: list[torch.Tensor], src: int = 0) -> list[torch.Tensor]:
    """Overwrite `tensors` in place with rank `src`'s values (same shapes and dtypes on every rank)."""
    if active():
        for t in tensors:
            torch.distributed.broadcast(t, src=src)
    return tensors


def all_reduce_sum_(tensors: list[torch.Tensor], count: int | float = 0) -> int | float:
    """Sum `tensors` in place over all ranks; returns the sum of `count` over all ranks (e.g. samples)."""
    if not active():
        return count
    for t in tensors:
        torch.distributed.all_reduce(t)
    dev = tensors[0].device if tensors else torch.device("cpu")
    n = torch.tensor([float(count)], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(n)
    total = n.item()
    return int(total) if isinstance(count, int) else total


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and return its result on every rank. If it raises a ForgetlessError, every
    rank raises the same error (same type, same message), so a bad run directory fails everywhere at once."""
    if not active():
        return fn()
    out: tuple[str, Any] = ("ok", None)
    if is_main():
        try:
            out = ("ok", fn())
        except ForgetlessError as e:
            out = ("error", (type(e), str(e)))
    out = broadcast_object(out)
    if out[0] == "error":
        kind, msg = out[1]
        raise kind(msg)
    return out[1]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (filling on-disk caches), the others after it (reading them)."""
    if not active():
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same(value: str, what: str) -> None:
    """Fail on every rank, naming `what`, unless all ranks hold the same `value` (a digest)."""
    if not active():
        return
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ForgetlessError(
            f"{what} differs between processes ({', '.join(f'rank {i}: {v}' for i, v in enumerate(values))}); "
            "every process must read the same files (a shared file system) with the same recipe"
        )


def shard(items: list[T]) -> list[T]:
    """This rank's share of `items` (every world_size-th item from index rank): disjoint, and together complete."""
    return items[rank() :: world_size()]


# ---------------------------------------------------------------- sharded parameters (FSDP2)
#
# Under FSDP2 every parameter is a DTensor: each rank holds a slice of it (dim 0, Shard(0)), and its .grad is
# the matching slice of the averaged gradient. Elementwise state kept beside a parameter (an anchor, a Fisher, an
# importance) is sliced the same way, so a penalty works on each rank's slice with no communication.


def is_sharded(t: Any) -> bool:
    """Whether `t` is a DTensor (an FSDP2 parameter or its gradient)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded parameter or gradient (the tensor itself when it is not sharded); in place
    operations on it change the DTensor."""
    return cast(Any, t).to_local() if is_sharded(t) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `whole` (shaped like the parameter `like`), as `like` is sliced: no communication."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    d = cast(Any, like)
    part = distribute_tensor(whole.to(d.device), d.device_mesh, d.placements, src_data_rank=None).to_local()
    return part.contiguous()


def gather_like(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's slice `part` (sliced as the parameter `like`): a collective, every rank
    calls it and gets the whole tensor."""
    if not is_sharded(like):
        return part
    from torch.distributed.tensor import DTensor

    d = cast(Any, like)
    return DTensor.from_local(part.to(d.device), d.device_mesh, d.placements, run_check=False, shape=d.shape,
                              stride=d.stride()).full_tensor()


# ---------------------------------------------------------------- engines


ENGINES = ("ddp", "fsdp", "deepspeed")


def env_engine() -> str | None:
    """The engine `accelerate launch --config_file ...` selected through its environment, if any."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return None


def engine(recipe: Any) -> str:
    """ddp, fsdp or deepspeed: train.distributed (with its accelerate config), else what `accelerate launch`
    set in the environment, else ddp (plain data parallel, or nothing at all in a single process)."""
    cfg = recipe.train.distributed  # an accelerate_config is already read into engine / fsdp / deepspeed
    chosen = cfg.engine if cfg is not None else "ddp"
    env = env_engine()
    if env and chosen != "ddp" and env != chosen:
        raise RecipeError(
            f"train.distributed.engine is {chosen} but accelerate launch was configured for {env}; "
            "make them agree (or leave train.distributed out and let the launch config decide)"
        )
    return env if chosen == "ddp" and env else chosen


def check_recipe(recipe: Any) -> str:
    """Refuse, naming the recipe key, what the chosen engine cannot run correctly. Returns the engine."""
    eng = engine(recipe)
    if eng == "ddp":
        return eng
    where = f"train.distributed.engine: {eng}"
    # each method and mitigation declares whether it works on sharded parameters (`shardable`; methods/,
    # mitigations/); DDP runs all of them
    if not recipe.method.shardable:
        raise RecipeError(
            f"method.name: {recipe.method.name} is not supported with {where} (supported: "
            f"{', '.join(recipe.shardable_names('methods'))}); use engine: ddp"
        )
    if getattr(recipe.method, "moves_base", False):
        raise RecipeError(f"method.init: {recipe.method.init} is not supported with {where} (its adapter is converted "
                          "against the original base when saved, which the sharded save does not do); use engine: ddp "
                          "or init default / gaussian")
    for m, cls in zip(recipe.mitigations, recipe.mitigation_classes(), strict=True):
        why = cls.unsharded_why if not cls.shardable else cls.deepspeed_why if eng == "deepspeed" else ""
        if why:
            raise RecipeError(f"mitigations.{m.name}: not supported with {where} ({why}); use engine: ddp"
                              + (", or engine: fsdp" if cls.shardable else ""))
    if eng == "deepspeed" and (recipe.monitor is not None or recipe.guard is not None):
        key = "guard" if recipe.guard is not None else "monitor"
        raise RecipeError(f"{key}: the retention monitor and guard run with engine: ddp or fsdp (their probe and "
                          f"rollback are not made to work with ZeRO's partitioned weights), not with {where}")
    return eng


def trainer_options(recipe: Any) -> dict[str, Any]:
    """The TrainingArguments options train.distributed asks for (fsdp / fsdp_config, deepspeed, ddp_*).
    Empty when train.distributed is absent, so single-process arguments are unchanged."""
    cfg = recipe.train.distributed
    if cfg is None:
        return {}
    opts: dict[str, Any] = {}
    if cfg.backend != "auto":
        opts["ddp_backend"] = cfg.backend
    if cfg.find_unused_parameters is not None:
        opts["ddp_find_unused_parameters"] = cfg.find_unused_parameters
    if cfg.timeout_s is not None:
        opts["ddp_timeout"] = cfg.timeout_s
    if cfg.engine == "fsdp":
        opts["fsdp"] = True
        opts["fsdp_config"] = (cfg.fsdp or FsdpOptions()).trainer_config()
    elif cfg.engine == "deepspeed":
        opts["deepspeed"] = (cfg.deepspeed or DeepSpeedOptions()).trainer_config()
    return opts


def read_accelerate_config(path: str) -> dict[str, Any]:
    """An accelerate config file (`accelerate config` writes one) as train.distributed options:
    engine, and the fsdp / deepspeed options it sets. Raises ValueError naming what is wrong."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not os.path.isfile(path):
        raise ValueError(f"accelerate config file {path} not found")
    try:
        cfg = load_config_from_file(path)
    except Exception as e:  # accelerate raises ValueError / TypeError / yaml errors for bad files
        raise ValueError(f"{path} is not a valid accelerate config: {e}") from None
    kind = str(getattr(cfg.distributed_type, "value", cfg.distributed_type))
    if kind in ("NO", "MULTI_CPU", "MULTI_GPU"):
        return {"engine": "ddp"}
    if kind == "FSDP":
        fc = {k.removeprefix("fsdp_"): v for k, v in (cfg.fsdp_config or {}).items()}
        version = int(fc.get("version", 1))
        if version != 2:
            raise ValueError(f"{path}: fsdp_version {version}; forgetless runs FSDP2 only (set fsdp_version: 2)")
        sdt = str(fc.get("state_dict_type") or "FULL_STATE_DICT")
        if sdt not in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
            raise ValueError(f"{path}: fsdp_state_dict_type {sdt}; forgetless checkpoints sharded and saves the final "
                             "model whole (FULL_STATE_DICT or SHARDED_STATE_DICT: either is read as that)")
        fsdp: dict[str, Any] = {}
        for src, dst in (("reshard_after_forward", "reshard_after_forward"), ("auto_wrap_policy", "auto_wrap_policy"),
                         ("min_num_params", "min_num_params"), ("offload_params", "cpu_offload"),
                         ("activation_checkpointing", "activation_checkpointing")):
            if fc.get(src) is not None:
                fsdp[dst] = fc[src]
        layers = fc.get("transformer_layer_cls_to_wrap")
        if layers:
            fsdp["transformer_layer_cls_to_wrap"] = ([s.strip() for s in layers.split(",")] if isinstance(layers, str)
                                                     else list(layers))
        return {"engine": "fsdp", "fsdp": fsdp}
    if kind == "DEEPSPEED":
        dc = dict(cfg.deepspeed_config or {})
        if dc.get("deepspeed_config_file"):
            return {"engine": "deepspeed", "deepspeed": {"config": dc["deepspeed_config_file"]}}
        ds: dict[str, Any] = {"stage": int(dc.get("zero_stage", 2))}
        for src, dst in (("offload_optimizer_device", "offload_optimizer"), ("offload_param_device", "offload_params")):
            dev = str(dc.get(src) or "none").lower()
            if dev not in ("none", "cpu"):
                raise ValueError(f"{path}: deepspeed {src}: {dev}; forgetless offloads to cpu only (or none)")
            ds[dst] = dev == "cpu"
        return {"engine": "deepspeed", "deepspeed": ds}
    raise ValueError(f"{path}: distributed_type {kind} is not supported; use MULTI_GPU/MULTI_CPU (DDP), FSDP or "
                     "DEEPSPEED")
