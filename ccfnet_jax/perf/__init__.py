"""Performance measurement: timing loops (`timing`), the steps under test (`train_step`), FLOPs and the matmul
reference (`flops`), the input pipeline (`pipeline`), per-op profiles (`op_profile`) and the suite that
`python -m ccfnet_jax.bench` runs (`suite`)."""
