"""ema: the moving average equals its closed form; the warm-up decay; the decay range."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccfnet_jax import ema


def test_constant_decay_equals_the_closed_form_after_n_steps():
  rng = np.random.default_rng(0)
  decay, n = 0.9, 7
  p0 = rng.normal(size=(3, 2)).astype(np.float32)
  sequence = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(n)]  # the weights after steps 1..n
  average = {"w": jnp.asarray(p0), "b": [jnp.asarray(p0[0])]}
  step = jax.jit(ema.update)
  for t, p in enumerate(sequence):
    average = step(average, {"w": p, "b": [p[0]]}, ema.decay_at(t, decay, warmup=False))
  # a_n = d^n p_0 + (1 - d) sum_k d^(n - k) p_k
  expected = decay ** n * p0 + (1 - decay) * sum(decay ** (n - k) * sequence[k - 1] for k in range(1, n + 1))
  np.testing.assert_allclose(average["w"], expected, rtol=1e-5)
  np.testing.assert_allclose(average["b"][0], expected[0], rtol=1e-5)
  assert average["w"].dtype == jnp.float32


def test_warmup_decay_follows_the_step_count_then_the_cap():
  np.testing.assert_allclose(ema.decay_at(0, 0.999), 1 / 10)
  np.testing.assert_allclose(ema.decay_at(90, 0.999), 91 / 100)
  np.testing.assert_allclose(ema.decay_at(10**6, 0.999), 0.999)
  np.testing.assert_allclose(ema.decay_at(20, 0.5), 0.5)  # the cap wins once (1 + t) / (10 + t) exceeds it
  steps = jnp.arange(3)
  np.testing.assert_allclose(jax.jit(lambda t: ema.decay_at(t, 0.99))(steps), [0.1, 2 / 11, 3 / 12], rtol=1e-6)
  # With warm-up the initial weights keep prod(d_t) (here a tenth after one step), not 0.999.
  out = ema.update(jnp.zeros(()), jnp.ones(()), ema.decay_at(0, 0.999))
  np.testing.assert_allclose(out, 0.9, rtol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_decay_outside_the_unit_interval_is_refused(bad):
  with pytest.raises(ValueError, match="EMA decay"):
    ema.decay_at(0, bad)


def test_turning_the_average_on_or_off_is_refused_on_resume_even_when_changes_are_allowed(tmp_path):
  from ccfnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from ccfnet_jax.train import loop  # pylint: disable=g-import-not-at-top
  first = config_lib.default_config()
  loop.check_run_config(first, str(tmp_path))  # the first launch writes config.json
  with_ema = config_lib.default_config()
  with_ema.ema_decay = 0.99
  with pytest.raises(loop.ConfigChangedError, match="ema_decay"):
    loop.check_run_config(with_ema, str(tmp_path), allow_change=True)
  changed_lr = config_lib.default_config()
  changed_lr.learning_rate = 1e-2
  loop.check_run_config(changed_lr, str(tmp_path), allow_change=True)  # other changes stay allowed
