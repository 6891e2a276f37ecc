"""Pretraining: resume, warm-start or initialise, then the one loop on the input pipeline.

    train(config, workdir)   to train.steps: log every train.log_every, evaluate every
                             train.eval_every and at the end, checkpoint every
                             checkpoint.every_steps and at the end or on SIGTERM/SIGINT
    initial_state(run, checkpoints)   the state a run starts from, and its data position

The loop, its logging, evaluation and checkpoint rules are `bertjax.train.loop`'s; this module
says what pretraining puts in them: the input pipeline's batches from a step or a saved position,
the held-out losses with their baselines, and checkpoint metadata that lets a resume continue the
data bit for bit.
"""

import contextlib
import logging

from bertjax.metrics import flops as flops_lib
from bertjax.train import checkpoint, compatibility
from bertjax.train import loop as loop_lib
from bertjax.train.run import Data, Run, evaluate, setup

log = logging.getLogger(__name__)


def _checkpoint_meta(run: Run, step: int) -> dict:
  return {
    **loop_lib.run_facts(run.config, run.model_config, run.tokenizer, run.steps.mesh),
    "data": run.pipeline.state_for(step),
  }


def initial_state(run: Run, checkpoints: checkpoint.Checkpoints, step: int | None = None):
  """(state, data position or None): resume this workdir, warm-start from another, or init.

  Args:
    run: the run's `setup` result.
    checkpoints: this workdir's checkpoints; any step there (or a damaged one) means resume.
    step: the step to resume from; None takes the newest restorable one.
  Returns:
    (state, data position): the TrainState on the run's mesh, and the checkpoint meta's `data`
    (`pipeline.state_for`'s dict) when resumed, else None.
  Raises:
    BertjaxError: a checkpoint (or `train.init_from`) that cannot be restored or does not fit this run.
  """
  t = run.config.train
  if checkpoints.steps() or checkpoints.damaged() or step is not None:
    state, meta = checkpoints.restore(
      run.steps.abstract_state(),
      step,
      check=lambda meta: compatibility.check_compatible(
        meta, run.model_config, run.tokenizer.fingerprint, f"--workdir {run.workdir}"
      ),
    )
    log.info("resumed from checkpoint step %d in %s", meta["step"], checkpoints.dir)
    return state, meta.get("data")
  if t.init_from:
    state = compatibility.warm_start(
      t.init_from,
      run.steps,
      run.model_config,
      params_only=t.init_params_only,
      seed=t.seed,
      tokenizer_fingerprint=run.tokenizer.fingerprint,
    )
    log.info(
      "started from %s at step %d (%s)",
      t.init_from,
      int(state.step),
      "parameters only" if t.init_params_only else "parameters, optimizer state and step",
    )
    return state, None
  return run.steps.init(t.seed), None


@contextlib.contextmanager
def _batches(run: Run, data_position, start: int):
  """The global batches from step `start`: from the saved data position when resumed."""
  if data_position is not None:
    source = run.pipeline.iterator_from_state(data_position, run.rows)
  else:
    source = run.pipeline.iterator(start, run.rows)
  with source as batches:

    def global_batches():
      for step in range(start, run.config.train.steps):
        batch_step, local = next(batches)
        assert batch_step == step, (batch_step, step)
        yield run.global_batch(local)

    yield global_batches()


def job(run: Run, data_position=None) -> loop_lib.Job:
  """What pretraining gives the one loop."""
  config, t = run.config, run.config.train
  eval_batches, reference = run.held_out()

  def held_out(params) -> dict[str, float]:
    final = evaluate(run, params, eval_batches)
    return {**final, **reference} if final else {}

  return loop_lib.Job(
    config=config,
    workdir=run.workdir,
    steps=run.steps,
    total_steps=t.steps,
    batches=lambda start: _batches(run, data_position, start),
    evaluate=held_out,
    eval_due=lambda done: done % t.eval_every == 0,
    checkpoint_meta=lambda step: _checkpoint_meta(run, step),
    epoch_of=run.pipeline.epoch_of,
    flops_per_sequence=flops_lib.flops_per_sequence(run.model_config, config.data.seq_len, config.data.max_predictions),
  )


def train(config, workdir, *, data: Data | None = None, state=None, step: int | None = None) -> loop_lib.Result:
  """Train to train.steps: resume WORKDIR's newest good checkpoint (or `step`), or warm-start
  from train.init_from, or start fresh; `state` overrides all three."""
  with contextlib.ExitStack() as stack:
    run, workdir_lock, checkpoints = loop_lib.open_workdir(stack, workdir, config, lambda: setup(config, workdir, data))
    data_position = None
    if state is None:
      state, data_position = initial_state(run, checkpoints, step)
    return loop_lib.fit(job(run, data_position), state, checkpoints, workdir_lock, stack)
