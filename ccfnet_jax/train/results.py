"""A run's results: each fold's best and last evaluation, the mean and std over folds, and the printed table."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from ccfnet_jax import checkpoint, metrics, rundir

COLUMNS = ("disc_recall", "vertebra_recall", "disc_auc", "vertebra_auc", "score")


def summarize_history(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """{'best': the evaluation `checkpoint.best_rank` puts first, 'last': the final one}; each holds the metrics plus
  'epoch' and 'step'."""
  if not history:
    raise ValueError("no evaluation was run")
  best_step = checkpoint.best_of([(h["step"], h["score"]) for h in history])
  best = next(h for h in history if h["step"] == best_step)
  keys = list(metrics.METRIC_NAMES) + ["epoch", "step"]
  return {"best": {k: best[k] for k in keys}, "last": {k: history[-1][k] for k in keys}}


def final_result(step: int, epoch: float | int, num_studies: int) -> dict[str, Any]:
  """The results of a run on every study: no held-out evaluation, so the last checkpoint is the model."""
  return {"final": {"step": step, "epoch": epoch, "checkpoint": "last", "train_studies": num_studies,
                    "note": "trained on every study: no fold held out, no validation metrics; the last "
                            "checkpoint is the model (predict / export take it with --fold=none)"}}


def collect_results(workdir: str | os.PathLike, num_folds: int) -> dict[str, Any]:
  """`workdir/results.json`'s content from every `fold_K/results.json` present.

  Returns:
    {'folds': {'K': {'best': {...metrics, 'epoch', 'step'}, 'last': {...}}}, and, when all `num_folds` folds are
    present, 'mean' and 'std' (ddof 0) = {'best': {metric: value}, 'last': {metric: value}} over the folds}.
  """
  folds: dict[str, Any] = {}
  for k in range(num_folds):
    path = os.path.join(rundir.fold_dir(workdir, k), rundir.RESULTS_FILE)
    if os.path.isfile(path):
      fold_result = rundir.read_json(path)
      folds[str(k)] = {"best": fold_result["best"], "last": fold_result["last"]}
  results: dict[str, Any] = {"folds": folds}
  final = os.path.join(rundir.fold_dir(workdir, rundir.FINAL_FOLD), rundir.RESULTS_FILE)
  if os.path.isfile(final):
    results["final"] = rundir.read_json(final)["final"]
  if len(folds) == num_folds:
    results["mean"], results["std"] = {}, {}
    for which in ("best", "last"):
      mean, std = metrics.summarize_folds([{m: folds[k][which][m] for m in metrics.METRIC_NAMES} for k in folds])
      results["mean"][which], results["std"][which] = mean, std
  return results


def model_label(config: ml_collections.ConfigDict) -> str:
  """'R18-MSC', 'R50', ... as in the paper's Table 1."""
  return f"R{config.model.depth}" + ("-MSC" if config.model.msc else "")


def format_table(results: Mapping[str, Any], config: ml_collections.ConfigDict, num_params: int | None = None) -> str:
  """A Markdown table like a row of the paper's Table 1 (metrics in %, mean +- std over folds when all ran)."""
  header = ("| method | backbone | params M | folds | epoch | disc recall | vertebra recall | disc AUC | "
            "vertebra AUC | score |")
  lines = [header, "|" + "---|" * 10]
  params = f"{num_params / 1e6:.2f}" if num_params else "?"
  name = "CCF-Net" if config.model.name == "ccfnet" else config.model.name
  folds = results["folds"]
  if "final" in results:
    final = results["final"]
    lines.append(f"| {name} | {model_label(config)} | {params} | every study ({final['train_studies']}) | "
                 f"last: {final['epoch']} | | | | | no held-out fold |")
  for which in ("best", "last"):
    if "mean" in results:
      cells = [f"{results['mean'][which][c]:.2f} ± {results['std'][which][c]:.2f}" for c in COLUMNS]
      epoch = "/".join(str(folds[k][which]["epoch"]) for k in sorted(folds))
      lines.append(f"| {name} | {model_label(config)} | {params} | {len(folds)}-fold mean ± std | {which}: {epoch} | "
                   + " | ".join(cells) + " |")
    for k in sorted(folds, key=int):
      row = folds[k][which]
      cells = [f"{row[c]:.2f}" for c in COLUMNS]
      lines.append(f"| {name} | {model_label(config)} | {params} | fold {k} | {which}: {row['epoch']} | "
                   + " | ".join(cells) + " |")
  return "\n".join(lines)


def next_steps(workdir: str, folds: Sequence[int | str], studies: tuple[Any, Any] | None = None) -> str:
  """Where a finished run put things, and the commands to try next (on `studies` = (folder, annotation file) of
  DICOM studies when there are some, else on a placeholder)."""
  fold = folds[-1]
  fold_flag = f" --fold={fold}" if len(folds) > 1 else ""
  folder, annotations = (str(studies[0]), str(studies[1])) if studies else ("STUDIES_DIR", "ANNOTATION_JSON")
  lines = [
      f"results:     {os.path.join(workdir, rundir.RESULTS_FILE)} (one fold: "
      f"{os.path.join(rundir.fold_dir(workdir, fold), rundir.RESULTS_FILE)})",
      f"checkpoints: {rundir.checkpoints_dir(workdir, fold)}",
      f"logs:        {os.path.join(rundir.fold_dir(workdir, fold), rundir.METRICS_FILE)}; "
      f"tensorboard --logdir {workdir}",
  ]
  if studies:
    lines.append(f"studies:     {folder} (new phantom studies as DICOM, annotations in {annotations})")
  preds = os.path.join(workdir, "preds.json")
  lines += [
      "next:",
      f"  python -m ccfnet_jax.predict --workdir={workdir}{fold_flag} --studies={folder} --annotations={annotations} "
      f"--output={preds} --overlays={os.path.join(workdir, 'overlays')} --report={os.path.join(workdir, 'report')}",
      f"  python -m ccfnet_jax.evaluate --predictions={preds} --annotations={annotations} --studies={folder}",
      f"  open {os.path.join(workdir, 'report', 'index.html')}  (the QC page: every study, its points and errors)",
      f"  python -m ccfnet_jax.export --workdir={workdir}{fold_flag} --output={os.path.join(workdir, 'model.jaxexport')}",
  ]
  return "\n".join(lines)
