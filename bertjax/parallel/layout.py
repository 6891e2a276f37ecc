"""Mesh shapes from the `mesh` config: plain arithmetic, no devices and no JAX.

    MESH_AXES           the mesh's axis names, outermost first
    check_mesh_config   every `mesh` value that can be checked without knowing the devices
    mesh_shape          (data, fsdp, tensor) for a device count
    check_batch_split   whether the global batch splits over that mesh and the microbatches

`mesh.parallelism` names a layout that fills the devices; `mesh.dcn_data` slices (TPU
multislice) or nodes (GPU) are always data-parallel, so only data parallelism crosses the slow
network between them (`bertjax.parallel.mesh.device_grid` places the devices accordingly).
"""

from bertjax.errors import BertjaxError

MESH_AXES = ("data", "fsdp", "tensor")


PARALLELISMS = ("", "data", "fsdp", "fsdp_tensor")


def _config_value(mesh_cfg, key: str, default):
  # A plain {data, fsdp, tensor} dict (tests, notebooks) leaves the layout keys out.
  return mesh_cfg.get(key, default)


def dcn_slices(mesh_cfg) -> int:
  """`mesh.dcn_data`: the slices (TPU multislice) or nodes (GPU) the mesh spans."""
  return _config_value(mesh_cfg, "dcn_data", 1)


def check_mesh_config(mesh_cfg) -> None:
  """Every `mesh` value that can be checked without knowing the device count."""
  for axis in MESH_AXES:
    size = mesh_cfg[axis]
    if size == 0 or size < -1:
      raise BertjaxError(f"config mesh.{axis}={size} is not a size; use a positive size, or -1 to fill")
  slices = dcn_slices(mesh_cfg)
  if slices < 1:
    raise BertjaxError(f"config mesh.dcn_data={slices} is not a slice count; use 1 (one slice or node) or more")
  parallelism = _config_value(mesh_cfg, "parallelism", "")
  if parallelism not in PARALLELISMS:
    raise BertjaxError(
      f"config mesh.parallelism={parallelism!r} is not a layout; choose data, fsdp, fsdp_tensor, "
      "or '' to give mesh.data/fsdp/tensor by hand"
    )
  if not parallelism:
    if [mesh_cfg[axis] for axis in MESH_AXES].count(-1) > 1:
      raise BertjaxError("config mesh: more than one axis is -1; leave at most one axis to fill")
    return
  # A named layout sizes data and fsdp itself: a hand-given size there would be silently ignored.
  for axis, default in (("data", -1), ("fsdp", 1)):
    if mesh_cfg[axis] != default:
      raise BertjaxError(
        f"config mesh.{axis}={mesh_cfg[axis]} conflicts with mesh.parallelism={parallelism}, which "
        f"sizes the mesh itself; leave mesh.{axis}={default} or set mesh.parallelism='' to size it by hand"
      )
  if parallelism == "fsdp_tensor" and mesh_cfg["tensor"] == -1:
    raise BertjaxError(
      "config mesh.tensor=-1 with mesh.parallelism=fsdp_tensor: give the tensor-parallel size, "
      "e.g. --config.mesh.tensor=4"
    )
  if parallelism != "fsdp_tensor" and mesh_cfg["tensor"] != 1:
    raise BertjaxError(
      f"config mesh.tensor={mesh_cfg['tensor']} is read only by mesh.parallelism=fsdp_tensor; "
      f"set mesh.parallelism=fsdp_tensor or mesh.tensor=1"
    )


def _named_mesh_shape(parallelism: str, tensor: int, device_count: int, slices: int) -> tuple[int, int, int]:
  """The (data, fsdp, tensor) of a named layout; slices are always data-parallel."""
  if parallelism == "data":
    return device_count, 1, 1
  per_slice = device_count // slices
  if parallelism == "fsdp":
    return slices, per_slice, 1
  if per_slice % tensor:
    raise BertjaxError(
      f"config mesh.tensor={tensor} does not divide the {per_slice} devices of a slice; "
      "choose a tensor size that divides the devices per slice (or node), e.g. 4 or 8"
    )
  return slices, per_slice // tensor, tensor


def _given_mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  """mesh.data x mesh.fsdp x mesh.tensor as written; one -1 fills with the remaining devices."""
  sizes = [mesh_cfg[axis] for axis in MESH_AXES]
  fixed = 1
  for size in sizes:
    fixed *= size if size != -1 else 1
  if -1 in sizes:
    if device_count % fixed:
      raise BertjaxError(
        f"config mesh: {device_count} devices do not divide by the fixed axes' product {fixed}; "
        "choose mesh sizes whose product divides the device count"
      )
    sizes[sizes.index(-1)] = device_count // fixed
  elif fixed != device_count:
    shape = "x".join(str(s) for s in sizes)
    raise BertjaxError(
      f"config mesh: data x fsdp x tensor = {shape} = {fixed} devices, but {device_count} are present; "
      "make the product match or set one axis to -1"
    )
  return tuple(sizes)


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from the `mesh` config for `device_count` devices.

  `mesh.parallelism` names a layout that fills the devices (`data`, `fsdp`, `fsdp_tensor` with
  `mesh.tensor` as the tensor size); empty uses mesh.data/fsdp/tensor as given, where one -1 fills
  with the remaining devices. `mesh.dcn_data` slices (or nodes) are data-parallel: the `data` axis
  is the only one that crosses the slow network between them (see `device_grid`).
  """
  slices = dcn_slices(mesh_cfg)
  if device_count % slices:
    raise BertjaxError(
      f"config mesh.dcn_data={slices}: {device_count} devices do not split into {slices} equal "
      "slices; set mesh.dcn_data to the number of slices (TPU) or nodes (GPU)"
    )
  parallelism = _config_value(mesh_cfg, "parallelism", "")
  if parallelism:
    return _named_mesh_shape(parallelism, mesh_cfg["tensor"], device_count, slices)
  data, fsdp, tensor = _given_mesh_shape(mesh_cfg, device_count)
  if data % slices:
    raise BertjaxError(
      f"config mesh.data={data} is not a multiple of mesh.dcn_data={slices}: slices are "
      "data-parallel, so set mesh.data to a multiple of the slice count (or -1)"
    )
  return data, fsdp, tensor


def check_batch_split(batch_size: int, grad_accum: int, mesh: tuple[int, int, int]) -> None:
  """The global batch must split evenly over the data-parallel devices and the microbatches."""
  data, fsdp, _ = mesh
  if batch_size % (data * fsdp * grad_accum):
    raise BertjaxError(
      f"config train.batch_size={batch_size} does not split over mesh data*fsdp={data * fsdp} "
      f"x grad_accum={grad_accum}; make the global batch a multiple of data*fsdp*grad_accum"
    )


# The logical axes the model names its parameters and activations with (docs/architecture.md,
# "Logical axes"), and the mesh axes each lands on: the default of `mesh.rules`, the one table.
# Parameters (no `act_` prefix) and activations (`act_`) have separate names so that the
# placement of one never constrains the other. An empty tuple replicates.
Rules = tuple[tuple[str, tuple[str, ...]], ...]
RULES: Rules = (
  ("layers", ()),
  ("vocab", ("tensor",)),
  ("embed", ("fsdp",)),
  ("embed_out", ("tensor",)),  # the output side of square [embed, embed] kernels (pooler, MLM transform)
  ("position", ()),
  ("segment", ()),
  ("qkv", ()),
  ("heads", ("tensor",)),
  ("kv", ()),
  ("mlp", ("tensor",)),
  ("classes", ()),
  ("act_batch", ("data", "fsdp")),
  ("act_length", ()),
  ("act_embed", ()),
  ("act_heads", ("tensor",)),
  ("act_kv", ()),
  ("act_mlp", ("tensor",)),
  ("act_vocab", ("tensor",)),
  ("act_predictions", ()),
)
LOGICAL_AXES = tuple(name for name, _ in RULES)


def format_rules(rules: Rules) -> str:
  """`mesh.rules`'s text for a table: `vocab=tensor,embed=fsdp,act_batch=data+fsdp,layers=,...`."""
  return ",".join(f"{name}={'+'.join(axes)}" for name, axes in rules)


def parse_rules(text: str) -> Rules:
  """The rules table `mesh.rules` asks for: its entries over the default table's.

  `text` is comma-separated `LOGICAL=MESH[+MESH...]` entries; `LOGICAL=` replicates that axis,
  and a logical axis it does not name keeps its entry in `RULES`. A problem is a BertjaxError of
  one line naming `mesh.rules` and the fix.
  """
  given: dict[str, tuple[str, ...]] = {}
  for entry in filter(None, (e.strip() for e in text.split(","))):
    name, sep, target = (part.strip() for part in entry.partition("="))
    if not sep:
      _bad_rule(f"{entry!r} has no '='", "write LOGICAL=MESH entries, e.g. embed=fsdp, or embed= to replicate")
    if name not in LOGICAL_AXES:
      _bad_rule(f"{name!r} is not a logical axis", f"use one of {', '.join(LOGICAL_AXES)}")
    if name in given:
      _bad_rule(f"{name} is given twice", f"keep one {name}= entry")
    axes = tuple(a.strip() for a in target.split("+")) if target else ()
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      _bad_rule(
        f"{entry} names mesh axis {unknown[0]!r}",
        f"map {name} to {', '.join(MESH_AXES)} joined by + (e.g. {name}=fsdp+tensor), or to nothing ({name}=)",
      )
    if len(set(axes)) < len(axes):
      _bad_rule(f"{entry} names a mesh axis twice", f"name each mesh axis once in {name}=")
    given[name] = axes
  return tuple((name, given.get(name, axes)) for name, axes in RULES)


def _bad_rule(problem: str, fix: str):
  raise BertjaxError(f"config mesh.rules: {problem}; {fix}")
