"""Our train step against the PyTorch twin of the reference, timed in turn in one process: JSON lines and the ratio.

    python -m benchmarks.compare_torch --config=configs/r18_msc.py --batch=2 --image_size=512 [--dtype=bfloat16] \
        [--rounds=3 --steps=3 --warmup=1] [--torch_convs=repeated|once] [--channels_last] [--torch_threads=N] \
        [--cpu_devices=N] [--output=FILE]

Both sides train the same model (`config.model`: CCF-Net, R18/R50, with or without MSC) from the same weights (ours
exported with `ccfnet_jax.convert.to_torch_state_dict`) on the same synthetic batch, without augmentation (the
reference augments on the host): ours is `ccfnet_jax.train`'s jitted step (targets, loss, backward, AdamW; the state
donated), the twin's is eager PyTorch (`benchmarks.torch_reference`, the reference's repeated multi-dilation convs
by default) with the targets made outside the step, as the reference's data loader does. After one untimed step of
each, whose losses are printed side by side (`first_step_loss`: the two must agree), each of `--rounds` rounds times
`--steps` steps of ours, then of the twin's; the figures are the medians over all rounds.

Both use every core this process may run on: JAX as it trains (one CPU device per core that divides the batch,
`--cpu_devices`), PyTorch with as many intra-op threads (`--torch_threads`). Lines: `first_step_loss`,
`jax_train_images_per_s`, `torch_train_images_per_s` (each with `median_s`, `min_s`, `max_s`, `n` of the wall time,
and `cpu_median_s` / `cpu_images_per_s` from the process CPU time of a step) and `jax_over_torch` (the ratio of the
images/s, > 1 when ours is faster, with both figures, and `cpu_ratio`, the same from CPU time), each with the context:
model, batch, image size, dtype, the twin's conv mode and memory format, JAX devices, PyTorch threads and CPU
capability, and the ISA settings (`XLA_FLAGS`, `ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`).

On a machine shared with other jobs the wall times measure the share of the cores each side got as much as the
step; the CPU times do not, and with one thread a side (`taskset -c 0`, `--torch_threads=1`) they measure the work
alone (with several threads, time spent spinning at barriers counts too).

One process rather than two alternating ones: the two steps then see the same machine state round by round, and no
time is lost starting and synchronising processes. The twin lives here, not in `ccfnet_jax`, because the library
does not depend on PyTorch.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Sequence
from typing import Any

import ml_collections
import torch
from absl import flags
from flax import nnx
from ml_collections import config_flags

from benchmarks import torch_reference
from ccfnet_jax import cli, convert, parallel, targets
from ccfnet_jax.perf import timing, train_step

ISA_VARIABLES = ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that limit the instruction sets of XLA, oneDNN, ATen and MKL (all in each line)."""

CONV_MODES = {"repeated": True, "once": False}
"""`--torch_convs` -> `torch_reference.CCFNet(repeat_convs=...)`."""


@dataclasses.dataclass
class Pair:
  """Our compiled train step and the twin's, on the same weights and batch."""

  jax_step: timing.DonatingStep  # () -> scalars (`loss`, the loss parts, ...)
  torch_step: torch_reference.TrainStep  # () -> loss
  setup: train_step.Steps
  context: dict[str, Any]


def build_pair(config: ml_collections.ConfigDict, *, batch_size: int, image_size: int, dtype: str = "float32",
               torch_convs: str = "repeated", channels_last: bool = False, num_devices: int = 0,
               model: nnx.Module | None = None, device: str = "cpu") -> Pair:
  """Builds and compiles our step and builds the twin's for `config.model` (a CCF-Net) at the given sizes.

  `model` replaces the config's freshly initialised model (its dtype must be `dtype`'s); the twin gets its weights.
  """
  if config.model.name != "ccfnet":
    raise ValueError(f"config.model.name = {config.model.name!r}: the PyTorch twin is CCF-Net only")
  if torch_convs not in CONV_MODES:
    raise ValueError(f"--torch_convs {torch_convs!r}: expected one of {sorted(CONV_MODES)}")
  config = train_step.with_sizes(config, batch_size=batch_size, image_size=image_size, dtype=dtype)
  model = train_step.create_model(config) if model is None else model
  host = train_step.synthetic_batch(batch_size, image_size)
  setup = train_step.build_steps(config, batch_size=batch_size, image_size=image_size, dtype=dtype, augment=False,
                                 num_devices=num_devices, model=model, batch=host)
  twin = torch_reference.CCFNet(config.model.depth, config.model.msc, repeat_convs=CONV_MODES[torch_convs])
  torch_reference.load_numpy_state_dict(twin, convert.to_torch_state_dict(model))
  encoded = targets.encode(host["points_xy"], host["point_valid"], (image_size, image_size), setup.settings.stride,
                           disease=host["disease"])
  torch_step = torch_reference.build_train_step(
      twin, host["image"], torch_reference.targets_from(encoded, host["disease"], device),
      learning_rate=config.learning_rate, weight_decay=config.weight_decay, dtype=dtype,
      channels_last=channels_last, device=device)
  context = {"model": setup.label, "batch": batch_size, "image_size": image_size, "dtype": dtype,
             "torch_convs": torch_convs, "channels_last": channels_last,
             "jax_devices": int(setup.mesh.devices.size), "jax_platform": setup.mesh.devices.flat[0].platform,
             "torch_device": device, "torch_threads": torch.get_num_threads(),
             "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             **{name.lower(): os.environ.get(name, "") for name in ISA_VARIABLES}}
  return Pair(jax_step=timing.DonatingStep(setup.compiled_train, setup.state, setup.train_batch),
              torch_step=torch_step, setup=setup, context=context)


def compare(pair: Pair, *, rounds: int, steps: int, warmup: int = 1) -> list[dict[str, Any]]:
  """Runs one step of each (printing their losses), then times them in alternating rounds and prints the figures.

  `warmup` untimed steps of each (at least the one whose loss is printed) come before the rounds.
  """
  ctx, batch = pair.context, pair.context["batch"]
  jax_loss = float(pair.jax_step()["loss"])
  torch_loss = float(pair.torch_step())
  lines = [timing.emit("first_step_loss", jax_loss, "loss", ctx, torch_loss=torch_loss,
                       relative_difference=abs(jax_loss - torch_loss) / max(abs(torch_loss), 1e-30))]
  seconds = timing.interleaved({"jax": pair.jax_step, "torch": pair.torch_step}, rounds=rounds, steps=steps,
                               warmup=max(warmup - 1, 0))
  rates, cpu_rates = {}, {}
  for name in ("jax", "torch"):
    wall, cpu = seconds[name]["wall_s"], seconds[name]["cpu_s"]
    rates[name] = batch / statistics.median(wall)
    cpu_rates[name] = batch / statistics.median(cpu)
    lines.append(timing.emit(f"{name}_train_images_per_s", rates[name], "images/s", ctx, **timing.spread(wall),
                             cpu_median_s=statistics.median(cpu), cpu_images_per_s=cpu_rates[name]))
  lines.append(timing.emit("jax_over_torch", rates["jax"] / rates["torch"], "x", ctx,
                           jax_images_per_s=rates["jax"], torch_images_per_s=rates["torch"],
                           cpu_ratio=cpu_rates["jax"] / cpu_rates["torch"], rounds=rounds, steps=steps,
                           what="train images/s of ours / of the PyTorch twin, timed in turn"))
  return lines


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs as the program)."""
  config_flags.DEFINE_config_file("config", "configs/r18_msc.py", "Experiment config file (its model: CCF-Net "
                                  "R18/R50, with or without MSC).")
  flags.DEFINE_integer("batch", 2, "Global batch size.")
  flags.DEFINE_integer("image_size", 512, "Input size S (images are S x S).")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (PyTorch: autocast).")
  flags.DEFINE_integer("rounds", 3, "Alternating rounds (ours, then the twin's).")
  flags.DEFINE_integer("steps", 3, "Timed steps of each per round.")
  flags.DEFINE_integer("warmup", 1, "Untimed steps of each before the rounds (at least 1).")
  flags.DEFINE_enum("torch_convs", "repeated", sorted(CONV_MODES), "The twin's multi-dilation convs: as the "
                    "reference runs them, or each computed once.")
  flags.DEFINE_bool("channels_last", False, "The twin in channels-last memory order.")
  flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads (0: one per usable core, as JAX uses).")
  flags.DEFINE_string("device", "cpu", "The twin's PyTorch device (cpu, cuda).")
  flags.DEFINE_string("output", "", "Also write the JSON lines to this file.")
  cli.define_device_flags()


def main(argv: Sequence[str]) -> None:
  del argv
  cli.configure_devices((FLAGS.batch,))
  torch.set_num_threads(FLAGS.torch_threads or parallel.usable_cores())
  pair = build_pair(FLAGS.config, batch_size=FLAGS.batch, image_size=FLAGS.image_size, dtype=FLAGS.dtype,
                    torch_convs=FLAGS.torch_convs, channels_last=FLAGS.channels_last, device=FLAGS.device)
  lines = compare(pair, rounds=FLAGS.rounds, steps=FLAGS.steps, warmup=FLAGS.warmup)
  if FLAGS.output:
    timing.write_lines(FLAGS.output, lines)


if __name__ == "__main__":
  cli.run(main, define_flags)
