"""Top-1 accuracy as an `evaluate` metric module, shipped with the project so that it loads offline by path:

    evaluate.load("evaluation/metrics/accuracy")   # or the path of this file

`evaluate.load("accuracy")` fetches its script from the Hub. This module computes the same quantity (the fraction of
predictions equal to their reference), as `evaluation.classification` reports it in percent.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predicted class ids equal to the reference class ids."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted class ids.
    references (`list[int]`): reference class ids.
Returns:
    accuracy (`float`): in [0, 1].
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.shape != references.shape or predictions.size == 0:
            raise ValueError(
                f"accuracy needs as many predictions as references (>0), got {predictions.shape} and {references.shape}."
            )
        return {"accuracy": float((predictions == references).mean())}
