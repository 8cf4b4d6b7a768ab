"""HellaSwag accuracy, completion style, as an `evaluate` module.

Load it with `evaluate.load(str(gpt2repro.eval.hellaswag_data.hellaswag_metric_path()))`. It is
self-contained (the loader copies this file alone), so it imports nothing from gpt2repro.
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{zellers2019hellaswag,
    title = {HellaSwag: Can a Machine Really Finish Your Sentence?},
    author = {Zellers, Rowan and Holtzman, Ari and Bisk, Yonatan and Farhadi, Ali and Choi, Yejin},
    booktitle = {Proceedings of the 57th Annual Meeting of the Association for Computational Linguistics},
    year = {2019},
}
"""

_DESCRIPTION = """\
HellaSwag asks which of four endings continues a short context. Scored completion style, a
language model reads the context followed by " " + each ending and is charged its summed
cross-entropy on the ending's tokens. Three rules pick an ending: `acc` the smallest summed loss
(the highest probability); `acc_norm_tokens` the smallest loss per token, as in the GPT-2
reproduction and the GPT-3 paper; `acc_norm` the smallest loss per character of the ending (without
its leading space), lm-eval's and the Open LLM Leaderboard's acc_norm. Chance is 0.25; OpenAI's
GPT-2 124M scores acc 0.2859 and acc_norm_tokens 0.2955 on the 10,042 validation examples, GPT-3
Small acc_norm_tokens 0.337.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: for each example, the summed cross-entropy (negative log-likelihood, nats) of
        each of its 4 endings, e.g. `sum_losses` from gpt2repro's evaluate_hellaswag predictions.
    ending_tokens: for each example, the number of tokens of each of its 4 endings (`num_tokens`).
    ending_chars: for each example, the length in characters of each of its 4 endings, without
        the space before them (`num_chars`; in Python, `len(ending)`).
    references: the index (0-3) of each example's true ending.
Returns:
    acc: fraction of examples whose true ending has the smallest summed loss.
    acc_norm_tokens: fraction of examples whose true ending has the smallest loss per token.
    acc_norm: fraction of examples whose true ending has the smallest loss per character (lm-eval).
    n: number of examples.
Examples:
    >>> hellaswag = evaluate.load("path/to/gpt2repro/metrics/hellaswag")
    >>> hellaswag.compute(predictions=[[9.0, 4.0, 8.0, 7.0]], ending_tokens=[[3, 1, 4, 4]],
    ...                   ending_chars=[[12, 3, 40, 20]], references=[2])
    {'acc': 0.0, 'acc_norm_tokens': 0.0, 'acc_norm': 1.0, 'n': 1}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HellaSwag(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64"), length=4),
                    "ending_tokens": datasets.Sequence(datasets.Value("int64"), length=4),
                    "ending_chars": datasets.Sequence(datasets.Value("int64"), length=4),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1905.07830", "https://rowanzellers.com/hellaswag/"],
        )

    def _compute(self, predictions, ending_tokens, ending_chars, references):
        sum_losses = np.asarray(predictions, dtype=np.float64).reshape(-1, 4)
        tokens = np.maximum(np.asarray(ending_tokens, dtype=np.float64).reshape(-1, 4), 1)
        chars = np.maximum(np.asarray(ending_chars, dtype=np.float64).reshape(-1, 4), 1)
        labels = np.asarray(references, dtype=np.int64)
        if len(labels) == 0:
            return {"acc": None, "acc_norm_tokens": None, "acc_norm": None, "n": 0}
        return {
            "acc": float(np.mean(sum_losses.argmin(axis=1) == labels)),
            "acc_norm_tokens": float(np.mean((sum_losses / tokens).argmin(axis=1) == labels)),
            "acc_norm": float(np.mean((sum_losses / chars).argmin(axis=1) == labels)),
            "n": int(len(labels)),
        }
