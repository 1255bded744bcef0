"""The one-call accelerator benchmark behind `benchmarks/gpu.sh`: everything a short GPU lease should measure.

In one process, within a time budget (a measurement that would start past it is skipped, with a line saying so):
1. the device's matmul rate in bfloat16 and float32 (what MFU is measured against);
2. per model (R18-MSC, R50-MSC) and dtype (bfloat16, float32): our train step and the PyTorch twin's at the paper's
   batch (32 / 12) at 512 px, timed in alternating rounds (`benchmarks.compare_torch`), with MFU;
3. in bfloat16, the batch that maximises images/s (doubling from the paper's until the rate stops rising or memory
   runs out), for both sides;
4. four folds stacked in one program (`vmap`) against one fold's step;
5. the training loop fed by the host pipeline and by data on the devices (`config.data_on_device`), on phantoms;
6. the projected wall time of the paper's schedule (4 folds x 60 epochs of 10 passes over 113 training studies)
   from the measured rates, one fold after another and stacked.
Output: JSON lines (stdout and `--output`), then a short Markdown table. `--toy` runs the same at toy sizes, which is
how a test checks the script on a CPU before any GPU is at hand.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from ccfnet_jax import cli, config as config_lib, parallel
from ccfnet_jax.perf import flops, loop, timing, train_step

FLAGS = flags.FLAGS
MODELS = {"r18_msc": ("configs/r18_msc.py", 32), "r50_msc": ("configs/r50_msc.py", 12)}
"""name -> (config file, the paper's batch)."""
PAPER_EPOCHS, PASSES_PER_EPOCH, TRAIN_STUDIES, NUM_FOLDS = 60, 10, 113, 4


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What is measured at which size (the real run, or `--toy`)."""

  image_size: int = 512
  batches: dict[str, int] | None = None  # model -> the paper's batch (None: MODELS)
  max_doublings: int = 3
  rounds: int = 3
  steps: int = 5
  warmup: int = 2
  matmul_size: int = 0  # 0: the platform's default
  loop_steps: int = 20
  loop_studies: int = 64
  folds: int = NUM_FOLDS


TOY = Sizes(image_size=128, batches={"r18_msc": 2, "r50_msc": 2}, max_doublings=1, rounds=1, steps=1, warmup=1,
            matmul_size=256, loop_steps=2, loop_studies=8, folds=2)


class Budget:
  """Wall-clock budget: `allows(seconds)` says whether a measurement expected to take that long may start."""

  def __init__(self, seconds: float):
    self.deadline = time.perf_counter() + seconds

  def allows(self, expected: float = 0.0) -> bool:
    return time.perf_counter() + expected < self.deadline


def _config(name: str, batch: int, sizes: Sizes, dtype: str):
  config = config_lib.load_config_file(MODELS[name][0])
  return train_step.with_sizes(config, batch_size=batch, image_size=sizes.image_size, dtype=dtype)


def _out_of_memory(error: BaseException) -> bool:
  text = f"{type(error).__name__}: {error}".lower()
  return any(word in text for word in ("resource_exhausted", "out of memory", "outofmemory", "oom"))


def side_by_side(name: str, batch: int, dtype: str, sizes: Sizes, device: str, matmul_rate: float | None,
                 emit: Callable[..., dict[str, Any]], record: Callable[[dict[str, Any]], Any]
                 ) -> dict[str, float] | None:
  """Ours and the twin's images/s at one setting (None when it does not fit in memory). `emit` prints and keeps a
  new line, `record` keeps one already printed (the side-by-side's own)."""
  from benchmarks import compare_torch  # pylint: disable=g-import-not-at-top  (torch is needed from here on)

  try:
    pair = compare_torch.build_pair(_config(name, batch, sizes, dtype), batch_size=batch,
                                    image_size=sizes.image_size, dtype=dtype, device=device)
    lines = compare_torch.compare(pair, rounds=sizes.rounds, steps=sizes.steps, warmup=sizes.warmup)
  except Exception as e:  # pylint: disable=broad-except  (an allocation failure ends a batch search)
    if not _out_of_memory(e):
      raise
    emit("out_of_memory", batch, "batch", {"model": name, "dtype": dtype}, error=str(e).splitlines()[0][:200])
    return None
  for line in lines:
    record(line)
  ratio = next(line for line in lines if line["metric"] == "jax_over_torch")
  result = {"jax": ratio["jax_images_per_s"], "torch": ratio["torch_images_per_s"], "ratio": ratio["value"]}
  if matmul_rate and pair.setup.flops:
    per_image = pair.setup.flops / batch
    result["mfu"] = result["jax"] * per_image / flops.mfu_reference(matmul_rate, pair.setup.mesh.devices.flat[0]
                                                                    .platform, pair.setup.mesh.devices.size)
    emit("mfu", result["mfu"], "fraction", {"model": name, "dtype": dtype, "batch": batch},
         flops_per_image=per_image, matmul_flops_per_s=matmul_rate)
  return result


def stacked_folds(name: str, batch: int, sizes: Sizes, emit) -> dict[str, float]:
  """Images/s of one fold's step and of `sizes.folds` folds stacked with vmap (bfloat16, the paper's batch)."""
  built = train_step.build_steps(_config(name, batch, sizes, "bfloat16"), batch_size=batch,
                                 image_size=sizes.image_size, dtype="bfloat16")
  single = timing.DonatingStep(built.compiled_train, built.state, built.train_batch)
  one = statistics.median(timing.time_calls(single, sizes.steps, sizes.warmup))
  stacked = train_step.build_stacked_folds(built, single.state, sizes.folds, "vmap")
  many = statistics.median(timing.time_calls(timing.DonatingStep(stacked.compiled, stacked.states, *stacked.args),
                                             sizes.steps, sizes.warmup))
  ctx = {"model": name, "batch": batch, "dtype": "bfloat16", "folds": sizes.folds, "fold_batching": "vmap"}
  out = {"one_fold": batch / one, "stacked": sizes.folds * batch / many}
  emit("folds_train_images_per_s", out["stacked"], "images/s", ctx, one_fold_images_per_s=out["one_fold"],
       speedup=out["stacked"] / out["one_fold"])
  return out


def data_feeding(name: str, batch: int, sizes: Sizes, emit) -> dict[str, float]:
  """The training loop's images/s fed by the host pipeline and by data on the devices (bfloat16, phantoms)."""
  out = {}
  with tempfile.TemporaryDirectory() as root:
    for on_device in (False, True):
      config = _config(name, batch, sizes, "bfloat16")
      with config.unlocked():
        config.dataset, config.phantom_studies, config.data_dir = "phantom", sizes.loop_studies, f"{root}/tfds"
        config.data_on_device = on_device
      rate = loop.loop_images_per_s(config, f"{root}/run_{on_device}", steps=sizes.loop_steps)
      out["device" if on_device else "host"] = rate
      emit("loop_train_images_per_s", rate, "images/s", {"model": name, "batch": batch, "dtype": "bfloat16",
                                                         "data_on_device": on_device})
  return out


def projected_hours(images_per_s: float, batch: int) -> float:
  """Hours of the paper's schedule for `NUM_FOLDS` folds at a measured rate (images per second, all folds'), the
  evaluations left out."""
  steps = PAPER_EPOCHS * math.ceil(PASSES_PER_EPOCH * TRAIN_STUDIES / batch)
  return NUM_FOLDS * steps * batch / images_per_s / 3600.0


def run(sizes: Sizes, *, models: Sequence[str], budget_s: float, device: str, output: str = "") -> list[dict]:
  lines: list[dict[str, Any]] = []

  def record(line):
    lines.append(line)
    return line

  def emit(metric, value, unit, context, **extra):
    return record(timing.emit(metric, value, unit, context, **extra))

  budget = Budget(budget_s)
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  emit("devices", jax.device_count(), "count", {"platform": platform, "kind": jax.devices()[0].device_kind,
                                                 "jax": jax.__version__})
  rates = {}
  for dtype in ("bfloat16", "float32"):
    rates[dtype], _ = flops.matmul_flops_per_s(sizes.matmul_size or flops.default_matmul_size(platform), dtype,
                                               steps=sizes.steps, warmup=sizes.warmup)
    emit("matmul_flops_per_s", rates[dtype], "FLOP/s", {"dtype": dtype, "platform": platform})
  table = []
  for name in models:
    paper_batch = (sizes.batches or {})[name] if sizes.batches else MODELS[name][1]
    for dtype in ("bfloat16", "float32"):
      if not budget.allows(60):
        emit("skipped", 0, "", {"model": name, "dtype": dtype, "what": "side by side at the paper's batch"})
        continue
      result = side_by_side(name, paper_batch, dtype, sizes, device, rates[dtype], emit, record)
      if result:
        table.append((name, dtype, paper_batch, "paper", result))
    best = next((r for r in table if r[0] == name and r[1] == "bfloat16"), None)
    batch = paper_batch
    for _ in range(sizes.max_doublings):
      batch *= 2
      if best is None or not budget.allows(90):
        break
      result = side_by_side(name, batch, "bfloat16", sizes, device, rates["bfloat16"], emit, record)
      if result is None or result["jax"] <= best[4]["jax"] * 1.02:
        if result:
          table.append((name, "bfloat16", batch, "search", result))
        break
      best = (name, "bfloat16", batch, "best", result)
      table.append(best)
    if best is not None:
      emit("best_batch", best[2], "batch", {"model": name, "dtype": "bfloat16"}, jax_images_per_s=best[4]["jax"],
           torch_images_per_s=best[4]["torch"])
      emit("projected_paper_schedule_hours", projected_hours(best[4]["jax"], best[2]), "h",
           {"model": name, "dtype": "bfloat16", "batch": best[2], "folds": "one after another"},
           torch_hours=projected_hours(best[4]["torch"], best[2]))
  if models and budget.allows(90):
    name = models[0]
    paper_batch = (sizes.batches or {})[name] if sizes.batches else MODELS[name][1]
    folds = stacked_folds(name, paper_batch, sizes, emit)
    emit("projected_paper_schedule_hours", projected_hours(folds["stacked"], paper_batch), "h",
         {"model": name, "dtype": "bfloat16", "batch": paper_batch, "folds": f"{sizes.folds} stacked"})
  if models and budget.allows(120):
    name = models[0]
    paper_batch = (sizes.batches or {})[name] if sizes.batches else MODELS[name][1]
    data_feeding(name, paper_batch, sizes, emit)
  print(markdown(table), flush=True)
  if output:
    timing.write_lines(output, lines)
  return lines


def markdown(table) -> str:
  rows = ["| model | dtype | batch | | ours img/s | PyTorch img/s | ours / PyTorch | MFU |",
          "|---|---|---|---|---|---|---|---|"]
  for name, dtype, batch, kind, r in table:
    mfu = f"{r['mfu']:.2f}" if "mfu" in r else ""
    rows.append(f"| {name} | {dtype} | {batch} | {kind} | {r['jax']:.1f} | {r['torch']:.1f} | {r['ratio']:.2f} | "
                f"{mfu} |")
  return "\n".join(rows)


def define_flags() -> None:
  flags.DEFINE_bool("toy", False, "Toy sizes (a CPU check of the script).")
  flags.DEFINE_list("models", list(MODELS), f"Models, of {sorted(MODELS)}.")
  flags.DEFINE_float("budget_s", 450.0, "Wall-clock budget: measurements that would start past it are skipped.")
  flags.DEFINE_string("device", "", "The twin's PyTorch device (default: cuda when available, else cpu).")
  flags.DEFINE_string("output", "", "Also write the JSON lines to this file.")
  cli.define_device_flags()


def main(argv: list[str]) -> None:
  del argv
  unknown = sorted(set(FLAGS.models) - set(MODELS))
  if unknown:
    raise cli.UserError(f"--models: unknown {unknown}; known: {sorted(MODELS)}")
  sizes = TOY if FLAGS.toy else Sizes()
  cli.configure_devices([b for b in (sizes.batches or {m: MODELS[m][1] for m in MODELS}).values()])
  import torch  # pylint: disable=g-import-not-at-top
  device = FLAGS.device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device == "cpu":
    torch.set_num_threads(parallel.usable_cores())
  run(sizes, models=FLAGS.models, budget_s=FLAGS.budget_s, device=device, output=FLAGS.output)


if __name__ == "__main__":
  cli.run(main, define_flags)
