"""Top-1 accuracy as an `evaluate` metric module, shipped with the project so that it loads offline by path:

    evaluate.load("evaluation/metrics/accuracy")   # or the path of this file

`evaluate.load("accuracy")` fetches its script from the Hub. This module is only the `evaluate` face of the project's
one accuracy, `evaluation.classification.topk_accuracy` (as a fraction here, in percent there).
"""

import datasets
import evaluate

from evaluation.classification import topk_accuracy

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
        return {"accuracy": topk_accuracy(predictions, references, (1,))["top1"] / 100}
