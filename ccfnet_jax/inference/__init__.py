"""Running trained models on new studies, with no training code: `loading` (find and restore a checkpoint),
`predictor` (batched inference on a mesh), `studies` (a folder of DICOM studies -> predictions), `predictions` (the
predictions file, written and read), `scoring` (the paper's metric of a predictions file), `artifact`
(`jax.export`), `report` (the QC page)."""
