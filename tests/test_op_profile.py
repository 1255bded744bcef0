"""ccfnet_jax.perf.op_profile: per-op time from a profiler trace joined with the compiled HLO."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ccfnet_jax.perf import op_profile

_HLO = """HloModule jit_f, entry_computation_layout={(f32[2]{0})->f32[2]{0}}

%fused_computation (param_0: f32[2,8,8,4]) -> f32[2,8,8,4] {
  %param_0 = f32[2,8,8,4]{3,2,1,0} parameter(0)
  ROOT %convolution = f32[2,8,8,4]{3,2,1,0} convolution(%param_0, %param_0), metadata={op_name="jit(f)/transpose(jvp())/conv_general_dilated"}
}

ENTRY %main.9 (p: f32[2,8,8,4]) -> f32[2,8,8,4] {
  %p = f32[2,8,8,4]{3,2,1,0} parameter(0)
  %add.1 = f32[2,8,8,4]{3,2,1,0} add(%p, %p), metadata={op_name="jit(f)/jvp()/add"}
  ROOT %conv_fusion = f32[2,8,8,4]{3,2,1,0} fusion(%add.1), kind=kCustom, calls=%fused_computation
}
"""


def test_instructions_take_their_fused_computations_op_name():
  instructions = op_profile.hlo_instructions(_HLO)
  assert instructions["add.1"] == {"shape": "f32[2,8,8,4]{3,2,1,0}", "op_name": "jit(f)/jvp()/add", "kind": "add"}
  assert instructions["conv_fusion"]["op_name"] == "jit(f)/transpose(jvp())/conv_general_dilated"
  assert instructions["conv_fusion"]["kind"] == "convolution"
  assert op_profile.pass_of(instructions["conv_fusion"]["op_name"]) == "backward"
  assert op_profile.pass_of(instructions["add.1"]["op_name"]) == "forward"
  assert op_profile.pass_of("jit(f)/mul") == "other" and op_profile.pass_of("") == "unknown"


def test_aggregate_keeps_module_ops_per_step_and_device():
  events = [{"ph": "X", "name": "conv_fusion", "dur": 3000.0}, {"ph": "X", "name": "conv_fusion", "dur": 5000.0},
            {"ph": "X", "name": "add.1", "dur": 1000.0}, {"ph": "X", "name": "$python frame", "dur": 9e6},
            {"ph": "i", "name": "add.1", "dur": 7e6}]
  rows = op_profile.aggregate(events, op_profile.hlo_instructions(_HLO), steps=2, devices=2)
  assert [r["op"] for r in rows] == ["conv_fusion", "add.1"]
  assert rows[0]["ms"] == pytest.approx(2.0) and rows[0]["calls"] == pytest.approx(0.5)
  assert op_profile.summarize(rows, "pass") == {"backward": pytest.approx(2.0), "forward": pytest.approx(0.25)}
  with pytest.raises(ValueError):
    op_profile.aggregate(events, {}, steps=0)


def test_profile_of_a_real_step_finds_its_forward_and_backward_convs(tmp_path):
  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.square(y))

  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((3, 3, 8, 8)), jnp.ones((1, 32, 32, 8))
  compiled = step.lower(w, x).compile()
  rows = op_profile.profile(lambda: compiled(w, x), compiled.as_text(), steps=2, trace_dir=str(tmp_path), devices=1)
  convs = [r for r in rows if r["kind"] == "convolution"]
  assert len(convs) >= 2 and {"forward"} <= {r["pass"] for r in convs}  # the forward conv and the weight gradient
  assert all(r["ms"] >= 0 for r in rows) and rows == sorted(rows, key=lambda r: -r["ms"])
