"""The logical-axis rules in use, and the shardings they give parameters, optimizer and batch.

The model names every parameter and activation dimension with a logical axis
(docs/architecture.md, "Logical axes"); a rules table alone decides where each lands on the
`data` x `fsdp` x `tensor` mesh, so changing parallelism is changing config (`mesh.rules`,
`mesh.*`), never model code. The default table is `bertjax.parallel.layout.RULES`.

    from_config    `mesh.rules` -> the table
    axis_rules     the table that `constrain` (inside model code) and the defaults below use
    traced_under   a function that traces under a table wherever it is jitted or lowered
    check_sharded  every large parameter split over the mesh axes the table promises
"""

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Sequence

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bertjax.errors import BertjaxError
from bertjax.parallel.layout import RULES, Rules, parse_rules

# Model code calls `constrain` with no config at hand: the table reaches it through this context,
# set where the steps are traced (`traced_under`), as the mesh reaches it through jax.set_mesh.
_ACTIVE: contextvars.ContextVar[Rules] = contextvars.ContextVar("bertjax_axis_rules", default=RULES)

# Parameters smaller than this (biases, LayerNorm scales) may stay whole: `check_sharded` skips them.
MIN_CHECKED_BYTES = 1 << 20


def from_config(mesh_cfg) -> Rules:
  """The table of a run config's `mesh` section (`mesh.rules` over `RULES`)."""
  return parse_rules(mesh_cfg.get("rules", ""))


def active_rules() -> Rules:
  return _ACTIVE.get()


@contextlib.contextmanager
def axis_rules(rules: Rules):
  """Within: `constrain`, and every function here not given a table, use `rules`."""
  token = _ACTIVE.set(rules)
  try:
    yield rules
  finally:
    _ACTIVE.reset(token)


def traced_under(rules: Rules, fn: Callable) -> Callable:
  """`fn` running under `axis_rules(rules)`: jitted, its activations are placed by `rules`
  whenever and wherever it is traced."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with axis_rules(rules):
      return fn(*args, **kwargs)

  return wrapped


def logical_to_spec(
  logical_axes: Sequence[str | None], rules: Rules | None = None, mesh_axis_names: Sequence[str] | None = None
) -> PartitionSpec:
  """The PartitionSpec for a tuple of logical names; a mesh axis is used at most once.

  A logical name whose mesh axes are already taken by an earlier dimension (or are not in
  `mesh_axis_names`, when given) is replicated, as in flax.linen's logical partitioning.
  """
  table = dict(active_rules() if rules is None else rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used and (mesh_axis_names is None or a in mesh_axis_names))
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical names under the current mesh and rules; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, mesh_axis_names=mesh.axis_names))


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def _logical_names(abstract_params: nnx.State) -> dict:
  return nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))


def param_specs(abstract_params: nnx.State, rules: Rules | None = None) -> dict:
  """Mesh PartitionSpecs for every parameter, from the logical names the model gives them."""
  return jax.tree.map(
    lambda spec: logical_to_spec(tuple(spec), rules), _logical_names(abstract_params), is_leaf=_is_spec
  )


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_shardings, mesh: Mesh):
  """Moments are sharded like their parameters (so by the same rules); counters and other scalars are replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_utils.tree_map_params(
    tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings, transform_non_params=lambda _: replicated
  )


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  """Rows of the global batch split as `act_batch` says (`data` and `fsdp`); sequence and features whole."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",), rules, mesh_axis_names=mesh.axis_names))


def check_sharded(
  abstract_params: nnx.State, placed, rules: Rules | None = None, min_bytes: int = MIN_CHECKED_BYTES
) -> None:
  """Raise a BertjaxError of one line for the first parameter of `min_bytes` or more that is not
  split over every mesh axis (of size > 1) that the rules promise it.

  A parameter is promised `fsdp` on a mesh with an `fsdp` axis (that is what FSDP is for), and
  every mesh axis the rules map one of its logical axes to: a table that leaves a large parameter
  whole under FSDP is caught, and so are shardings that do not follow the table (made with
  another one, or restored as another run placed them).

  Args:
    abstract_params: the model's parameters, abstract (`nnx.state(abstract_model, nnx.Param)`):
      shapes, dtypes and logical names.
    placed: the same tree (a pure dict) of NamedShardings, or of arrays (or ShapeDtypeStructs)
      that carry one, e.g. the train state's parameters after init.
    rules: the table the shardings were made with; None: the active one.
  """
  table = dict(active_rules() if rules is None else rules)
  logical = jax.tree_util.tree_leaves_with_path(_logical_names(abstract_params), is_leaf=_is_spec)
  values = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract_params)))
  shardings = dict(jax.tree_util.tree_leaves_with_path(placed, is_leaf=lambda x: isinstance(x, NamedSharding)))
  for path, names in logical:
    value, sharding = values[path], shardings[path]
    sharding = sharding if isinstance(sharding, NamedSharding) else sharding.sharding
    nbytes = math.prod(value.shape) * value.dtype.itemsize
    if nbytes < min_bytes:
      continue
    sizes = dict(sharding.mesh.shape)
    split = {a for entry in sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}
    for axis, why in _promised(tuple(names), table, sizes):
      if axis not in split:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise BertjaxError(
          f"parameter {where} [{', '.join(str(n) for n in names)}] ({_size(nbytes)}), placed as "
          f"{sharding.spec}, is not split over mesh axis {axis} (size {sizes[axis]}): {why}"
        )


def _size(nbytes: int) -> str:
  return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KiB"


def _promised(names: tuple, table: dict, sizes: dict) -> list[tuple[str, str]]:
  """(mesh axis, why) for each axis of size > 1 that a parameter with logical axes `names` should be split over."""
  mapped = {n: tuple(table.get(n) or ()) for n in names if n is not None}
  promised = []
  if sizes.get("fsdp", 1) > 1 and not any("fsdp" in axes for axes in mapped.values()):
    entries = ", ".join(f"{n}={'+'.join(axes)}" for n, axes in mapped.items())
    fix = "map one to fsdp, e.g. --config.mesh.rules=embed=fsdp"
    promised.append(("fsdp", f"mesh.rules maps none of its axes to fsdp ({entries}); {fix}"))
  for name, axes in mapped.items():
    for axis in axes:
      if sizes.get(axis, 1) > 1 and axis not in dict(promised):
        promised.append((axis, f"mesh.rules' {name}={'+'.join(axes)} promises it"))
  return promised
