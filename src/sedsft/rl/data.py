"""RL prompt sets: rows of any supported source -> TRL's dataset (``prompt`` as chat messages,
``gold`` as the reference answer the reward checks).

Sources are the project's (``sedsft.data.sources``): a local ``.json`` / ``.jsonl`` /
``.parquet`` file (verl's RL schema: ``prompt`` = messages, ``reward_model.ground_truth``;
question / answer rows; any SFT row shape, whose last assistant turn is dropped), a hub
data set, or :class:`ToyMathRLSource`, toy problems drawn apart from the SFT and held-out
sets. Rows are read with ``sedsft.data.formats`` (``to_prompt``, ``gold_answer``), so an RL
file is understood exactly as ``src/eval.py`` understands it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from sedsft.data import toy_math
from sedsft.data.formats import DataError, gold_answer, to_prompt
from sedsft.data.sources import LocalFileSource, _digest

log = logging.getLogger(__name__)

GOLD_COLUMN = "gold"  # the reference answer passed to reward functions (TRL forwards dataset columns)
GOLD_FIELDS = "'gold', 'reward_model.ground_truth' or 'answer'"  # where rl_gold looks, for error messages


def rl_gold(row: Mapping[str, Any]) -> str | None:
    """The reference answer of an RL row: ``gold_answer`` (``gold``, verl's
    ``reward_model.ground_truth``, ``answer`` next to a ``response``), or else a bare
    ``answer`` column: in a question / answer RL file the answer is the short reference
    (in SFT it would be the reply, which is why ``gold_answer`` alone ignores it)."""
    gold = gold_answer(row)
    if gold is None and row.get("response") is None and row.get("answer") is not None:
        answer = str(row["answer"])
        gold = answer if answer.strip() else None
    return gold


def question_text(row: Mapping[str, Any], source: str, index: int) -> str:
    """The last user turn of a row, whitespace-normalised: what makes two problems the same."""
    prompt = to_prompt(row, source, index)
    return " ".join(prompt[-1]["content"].split())


@dataclass
class ToyMathRLSource:
    """Toy problems for RL, drawn apart from the SFT and held-out problems.

    Generates ``toy_math`` problems with ``seed`` (a seed no SFT or eval split uses) and
    drops every problem whose question appears in an ``exclude`` source (by default the
    SFT training and held-out sets of ``data=toy_math``), and duplicates, until ``n``
    remain. Rows: ``{"question", "gold"}``.

    Attributes:
        n: number of problems.
        seed: generation seed.
        exclude: sources (anything with ``load()`` and ``name``) whose problems are left out.
    """

    n: int = 1024
    seed: int = 1234
    exclude: Sequence[Any] = field(default_factory=list)

    def __post_init__(self):
        # Hydra hands nested dataclass instances over as OmegaConf structured configs
        self.exclude = [OmegaConf.to_object(s) if isinstance(s, DictConfig | ListConfig) else s for s in self.exclude]

    @property
    def name(self) -> str:
        return f"toy_math_rl(n={self.n}, seed={self.seed})"

    def fingerprint(self) -> str:
        return _digest({"toy_math_rl": [self.n, self.seed, [getattr(s, "name", str(s)) for s in self.exclude]]})

    def excluded_questions(self) -> set[str]:
        questions = set()
        for source in self.exclude:
            rows = source.load()
            questions.update(question_text(rows[i], source.name, i) for i in range(len(rows)))
        return questions

    def load(self) -> datasets.Dataset:
        if self.n < 1:
            raise ValueError(f"{self.name}: n must be >= 1, got {self.n}")
        excluded = self.excluded_questions()
        rows: list[dict[str, str]] = []
        seen: set[str] = set()
        # generate() is prefix-stable in n for a fixed seed, so growing the request only appends
        count = self.n
        while len(rows) < self.n:
            if count > 50 * self.n + 1000:
                raise DataError(self.name, None, None, f"could not draw {self.n} problems outside the excluded sets")
            candidates = toy_math.generate(count, self.seed)
            rows, seen = [], set()
            for row in candidates:
                question = " ".join(row["question"].split())
                if question in excluded or question in seen:
                    continue
                seen.add(question)
                rows.append({"question": row["question"], GOLD_COLUMN: row["answer"]})
                if len(rows) == self.n:
                    break
            count *= 2
        return datasets.Dataset.from_list(rows)


def rl_rows(
    source: Any, system_prompt: str | None = None, max_skip_frac: float = 0.01
) -> tuple[list[list[dict[str, str]]], list[str | None], list[str]]:
    """Prompts (chat messages), gold answers and the problems of the rows left out.

    A row that is not a prompt (``DataError``) is skipped and named; more than
    ``max_skip_frac`` of them stops the run. Gold answers may be None here; the caller
    decides (training drops such rows, evaluation leaves them out of accuracy).
    """
    table = source.load()
    prompts, golds, problems = [], [], []
    for index in range(len(table)):
        row = table[index]
        # a question / answer row is a prompt and its reference, even with a blank answer
        as_prompt = {k: v for k, v in row.items() if k != "answer"} if row.get("response") is None else row
        try:
            prompt = to_prompt(as_prompt, source.name, index, system_prompt)
        except DataError as err:
            problems.append(str(err))
            continue
        prompts.append(prompt)
        golds.append(rl_gold(row))
    total = len(table)
    if problems:
        log.warning("%s: skipped %d of %d rows, e.g. %s", source.name, len(problems), total, problems[0])
        if len(problems) > max_skip_frac * total:
            raise DataError(
                source.name, None, None,
                f"{len(problems)} of {total} rows are not prompts (more than data.max_skip_frac="
                f"{max_skip_frac}); first: {problems[0]}",
            )  # fmt: skip
    return prompts, golds, problems


def build_train_dataset(data_cfg: DictConfig) -> datasets.Dataset:
    """TRL's training set from the data config's ``train`` source: columns ``prompt``
    (list of messages), ``gold`` (str) and ``row`` (index in the source).

    Rows without a gold answer cannot be rewarded and are dropped with a warning naming them.
    """
    source = hydra.utils.instantiate(data_cfg.train)
    prompts, golds, _ = rl_rows(source, data_cfg.get("system_prompt"), data_cfg.get("max_skip_frac", 0.01))
    keep = [i for i, gold in enumerate(golds) if gold is not None]
    missing = [i for i, gold in enumerate(golds) if gold is None]
    if missing:
        log.warning(
            "%s: %d of %d prompts have no gold answer and are left out of RL (prompt indices %s%s)",
            source.name, len(missing), len(golds), missing[:10], " ..." if len(missing) > 10 else "",
        )  # fmt: skip
    if not keep:
        first = source.load()[0] if golds else {}  # only read again to name what the rows hold
        raise DataError(
            source.name, None, None,
            f"no prompt has a gold answer, so nothing can be rewarded: the reward reads {GOLD_FIELDS} "
            f"(a non-blank value); row 0 has {sorted(first)}: add one of these fields",
        )  # fmt: skip
    return datasets.Dataset.from_dict(
        {
            "prompt": [prompts[i] for i in keep],
            GOLD_COLUMN: [golds[i] for i in keep],
            "row": keep,
        }
    )


def heldout_prompts(cfg: DictConfig) -> tuple[list[list[dict[str, str]]], list[str | None], str] | None:
    """The held-out prompts and golds of an RL run, and their source's name: the first
    ``heldout.num_prompts`` of the file ``heldout.path``, else of the data config's ``val``
    source (None: neither is set)."""
    if cfg.heldout.get("path"):
        source = LocalFileSource(path=str(cfg.heldout.path), sha256=cfg.heldout.get("sha256"))
    elif cfg.data.get("val") is not None:
        source = hydra.utils.instantiate(cfg.data.val)
    else:
        return None
    prompts, golds, _ = rl_rows(source, cfg.data.get("system_prompt"), max_skip_frac=1.0)
    limit = cfg.heldout.get("num_prompts")
    if limit is not None:
        prompts, golds = prompts[:limit], golds[:limit]
    if not prompts:
        raise DataError(source.name, None, None, "no held-out prompts to evaluate")
    return prompts, golds, source.name
