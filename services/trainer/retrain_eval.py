"""The evaluation gate's measurement: a retraining run's candidate and the serving version on the
same held-out split, the test split of the run's dataset version as training makes it.

The trainer fetches the dataset version and both TorchScript artifacts into a folder of their
own, then runs `python -m services.trainer.retrain_eval FOLDER` (torch stays out of the service
process, and a tenant's model runs with no secret of the trainer in its environment). The
process prints one JSON line: {"metrics": [one per model], "samples": n} or {"error": message}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition
from services.trainer.registry_link import RegistryLink
from services.trainer.retrain import Evaluation, EvaluationRequest
from services.trainer.worker import watch_trainer

log = logging.getLogger(__name__)

CONFIG_FILE = "evaluation.json"
LOG_FILE = "evaluation.log"
EVAL_BATCH = 1024


class ArtifactEvaluator:
    """retrain.Evaluator over the registry: each evaluation in `root`/<run id>, removed after."""

    def __init__(self, registry: RegistryLink, root: Path, timeout_seconds: float, threads: int) -> None:
        self._registry = registry
        self._root = root
        self._timeout = timeout_seconds
        self._threads = threads

    async def evaluate(self, tenant: str, request: EvaluationRequest) -> Evaluation:
        folder = self._root / request.run_id
        # A run evaluated again after a restart starts from nothing.
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            dataset = await self._registry.fetch_dataset(tenant, request.dataset, request.dataset_version, folder)
            models = []
            for role, version in (("candidate", request.candidate_version), ("serving", request.serving_version)):
                if not version:
                    continue
                path = folder / f"{role}.pt"
                source = await self._registry.fetch_version(tenant, request.model, version, path)
                if source.format != "TORCHSCRIPT":
                    raise FailedPrecondition(
                        f"{request.model} version {version} is {source.format}: the evaluation gate measures "
                        "TorchScript versions; deploy a trained version, or set the policy without a deployment"
                    )
                models.append({"version": version, "path": path.name,
                               "class_names": source.metadata.get("class_names", "")})
            config = {"dataset_file": dataset.path.name, "dataset_format": dataset.format,
                      "target_column": dataset.target_column, "spec": request.spec, "metric": request.metric,
                      "models": models}
            await asyncio.to_thread((folder / CONFIG_FILE).write_text, json.dumps(config))
            result = await self._run(folder)
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)
        metrics = [float(m) for m in result["metrics"]]
        return Evaluation(metrics[0], metrics[1] if len(metrics) > 1 else None, int(result["samples"]))

    async def _run(self, folder: Path) -> dict[str, Any]:
        # The models are the tenant's: the process gets no MAAS_ setting (the internal token among them).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAAS_")}
        env.update(OMP_NUM_THREADS=str(self._threads), PYTHONUNBUFFERED="1")
        with (folder / LOG_FILE).open("ab") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.trainer.retrain_eval", str(folder), stdout=asyncio.subprocess.PIPE,
                stderr=errors, stdin=asyncio.subprocess.DEVNULL, env=env, cwd=folder, start_new_session=True,
            )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), self._timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise FailedPrecondition(f"the evaluation took longer than {self._timeout:g} s and was stopped") from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        try:
            result = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (folder / LOG_FILE).read_text(errors="replace").strip().splitlines()[-3:]
            raise FailedPrecondition(
                f"the evaluation exited with code {process.returncode}: {' | '.join(tail) or 'no output'}"
            ) from None
        if "error" in result:
            raise FailedPrecondition(f"the evaluation failed: {result['error']}")
        return result


def measure(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Each model's metric on the test split of the dataset, as training splits it."""
    import numpy as np
    import torch

    from services.trainer import data as datasets
    from services.trainer.spec import TrainingSpec

    spec = TrainingSpec.from_dict(config["spec"])
    arrays = datasets.load_file(folder / config["dataset_file"], config["dataset_format"], config["target_column"],
                                spec.task)
    assert spec.validation_fraction is not None and spec.test_fraction is not None and spec.seed is not None
    _, _, test = datasets.split(arrays, spec.validation_fraction, spec.test_fraction, spec.seed, spec.max_samples)
    if not len(test):
        raise ValueError("the test split is empty: the dataset version has too few samples")
    x = torch.from_numpy(arrays.x[test])
    metrics = []
    for model in config["models"]:
        module = torch.jit.load(str(folder / model["path"]), map_location="cpu")
        module.eval()
        with torch.no_grad():
            parts = [module(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
        if not all(isinstance(part, torch.Tensor) for part in parts):
            raise ValueError(f"version {model['version']} does not return one tensor")
        outputs = torch.cat(parts).float()
        if config["metric"] == "accuracy":
            labels = _labels_for(arrays.y[test], arrays.class_names, model["class_names"])
            if outputs.dim() != 2 or len(outputs) != len(labels):
                raise ValueError(f"version {model['version']} returns {list(outputs.shape)}, not one score per class")
            metrics.append(float((outputs.argmax(1).numpy() == labels).mean()))
        else:
            y = torch.from_numpy(arrays.y[test].astype(np.float32))
            y = y.unsqueeze(1) if y.dim() == 1 else y
            if outputs.shape != y.shape:
                raise ValueError(f"version {model['version']} returns {list(outputs.shape)} for targets {list(y.shape)}")
            total = ((y - y.mean(0)) ** 2).sum().item()
            metrics.append(1.0 - ((outputs - y) ** 2).sum().item() / total if total > 0 else 0.0)
    return {"metrics": metrics, "samples": len(test)}


def _labels_for(y: Any, dataset_names: list[str], model_names: str) -> Any:
    """The dataset's labels as the model numbers its classes: a CSV's text labels are numbered
    in sorted order per file, so a version trained on other data may number them otherwise."""
    import numpy as np

    names = model_names.split(",") if model_names else []
    if not dataset_names or not names or names == dataset_names:
        return np.asarray(y)
    index = {name: i for i, name in enumerate(names)}
    # A class the model never saw can never be predicted right: -1 matches no output.
    lookup = np.array([index.get(name, -1) for name in dataset_names])
    return lookup[np.asarray(y, dtype=np.int64)]


def main(folder: Path) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    # A trainer killed meanwhile evaluates the run again once it restarts: this one stops.
    threading.Thread(target=watch_trainer, args=(os.getppid(), os.getppid()), daemon=True).start()
    try:
        result = measure(folder, json.loads((folder / CONFIG_FILE).read_text()))
    except Exception as exc:  # every failure becomes the run's reason, not a bare exit code
        logging.getLogger(__name__).exception("the evaluation failed")
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
