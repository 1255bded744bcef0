"""Learning-rate schedules (docs/method.md#training): cosine annealing with warm restarts, and one cosine to a floor.

Each schedule is a pure function of the integer step (an optax schedule), so a resumed run sees exactly the
learning rate of an uninterrupted one.
"""

from __future__ import annotations

import optax


def cosine_warm_restarts(peak_lr: float, min_lr: float, first_cycle_steps: int, cycle_mult: float,
                         total_steps: int) -> optax.Schedule:
  """Cosine annealing with warm restarts (SGDR, as torch's CosineAnnealingWarmRestarts, stepped every step).

  Cycle i lasts `first_cycle_steps * cycle_mult**i` steps; inside a cycle of T steps, at t steps from its start,
  `lr = min_lr + (peak_lr - min_lr) * (1 + cos(pi * t / T)) / 2`. Restarts to `peak_lr` at every cycle start.

  Args:
    peak_lr: learning rate at each cycle start.
    min_lr: the floor reached at each cycle end.
    first_cycle_steps: length T0 of the first cycle, steps (> 0).
    cycle_mult: T_mult >= 1, the growth factor of successive cycles.
    total_steps: the schedule covers at least this many steps (later steps continue the last cycle's pattern).
  """
  if first_cycle_steps <= 0:
    raise ValueError(f"first_cycle_steps must be > 0, got {first_cycle_steps}")
  if cycle_mult < 1:
    raise ValueError(f"cycle_mult must be >= 1, got {cycle_mult}")
  if not 0 <= min_lr <= peak_lr:
    raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
  alpha = min_lr / peak_lr if peak_lr > 0 else 0.0
  cycles, boundaries = [], []
  start, length = 0, float(first_cycle_steps)
  while True:
    steps = max(1, int(round(length)))
    cycles.append(optax.cosine_decay_schedule(peak_lr, steps, alpha=alpha))
    start += steps
    if start >= total_steps:
      break
    boundaries.append(start)
    length *= cycle_mult
  if len(cycles) == 1:
    return cycles[0]
  return optax.join_schedules(cycles, boundaries)


def cosine_to_floor(peak_lr: float, min_lr: float, total_steps: int) -> optax.Schedule:
  """One cosine from `peak_lr` at step 0 to `min_lr` at `total_steps` (then constant)."""
  if not 0 <= min_lr <= peak_lr:
    raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={min_lr}, peak_lr={peak_lr}")
  return optax.cosine_decay_schedule(peak_lr, max(1, int(total_steps)), alpha=min_lr / peak_lr if peak_lr else 0.0)


def create_schedule(name: str, *, peak_lr: float, min_lr: float, total_steps: int, steps_per_epoch: int,
                    first_cycle_epochs: float = 20, cycle_mult: float = 2, warmup_steps: int = 0) -> optax.Schedule:
  """The schedule named by `config.schedule`: 'cosine_warm_restarts' | 'cosine' | 'constant', optionally warmed up.

  Args:
    name: schedule name.
    peak_lr, min_lr: learning rates.
    total_steps: length of the run, steps.
    steps_per_epoch: steps in one epoch (the restart period is given in epochs).
    first_cycle_epochs: T0 in epochs (warm restarts only).
    cycle_mult: T_mult (warm restarts only).
    warmup_steps: a linear warm-up from 0 over this many steps before the schedule (0: none).
  """
  if name == "cosine_warm_restarts":
    first_cycle_steps = max(1, int(round(first_cycle_epochs * steps_per_epoch)))
    schedule = cosine_warm_restarts(peak_lr, min_lr, first_cycle_steps, cycle_mult, total_steps)
  elif name == "cosine":
    schedule = cosine_to_floor(peak_lr, min_lr, max(1, total_steps - warmup_steps))
  elif name == "constant":
    schedule = optax.constant_schedule(peak_lr)
  else:
    raise ValueError(f"config.schedule = {name!r}: expected 'cosine_warm_restarts', 'cosine' or 'constant'")
  if warmup_steps > 0:
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    schedule = optax.join_schedules([warmup, schedule], [warmup_steps])
  return schedule
