"""The routes report: accuracy per difficulty and per route of a policy on the routes task.

Two measurements on held-out routes problems (``toy_routes``, easy and hard):

- **Free sampling**: ``num_samples`` completions per prompt as the policy samples them;
  per difficulty the pass@k curve (k = 1 .. ``num_samples``, unbiased estimator), the share
  of each route among the samples and each route's accuracy.
- **Forced routes**: the reply is started with a route's first words
  (``toy_routes.route_prefix``) and sampled on, which measures what each route is worth on
  each difficulty whatever the policy would pick (gate G1: the working route's hard
  accuracy against the dominant route's).

``python -m sedsft.pipeline.routes <model dir> [--out report.json]`` writes the report of one
policy (a Hugging Face directory, an SFT run or an RL run's ``hf/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sedsft.data import toy_routes
from sedsft.data.route_steps import steps_hold
from sedsft.metrics import is_correct
from sedsft.metrics.pass_at_k import pass_at_k
from sedsft.pipeline.stages import stage_config, stage_overrides

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_with_prefix(
    model,
    tokenizer,
    questions: Sequence[str],
    prefixes: Sequence[str],
    num_samples: int,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[str]]:
    """``num_samples`` replies per question, each starting with its prefix (the prefix is
    part of the returned text; an empty prefix is free sampling). Temperature 1, no top-p:
    the policy's own distribution, as in RL rollouts."""
    if len(questions) != len(prefixes):
        raise ValueError(f"{len(questions)} questions but {len(prefixes)} prefixes")
    torch.manual_seed(seed)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) + p
        for q, p in zip(questions, prefixes, strict=True)
    ]
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[list[str]] = []
    try:
        for begin in range(0, len(texts), batch_size):
            chunk = texts[begin : begin + batch_size]
            inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(
                **inputs,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            decoded = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, prefix in enumerate(prefixes[begin : begin + batch_size]):
                out.append([prefix + d for d in decoded[i * num_samples : (i + 1) * num_samples]])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


Verify = Callable[[str, str], bool]
"""(question, reply) -> whether the reply's steps hold (``route_steps.steps_hold``)."""


def judge(question: str, reply: str, gold: str, verify: Verify | None) -> bool:
    """A reply is right when its boxed answer is, and, with ``verify``, its steps hold too."""
    return is_correct(reply, gold) and (verify is None or verify(question, reply))


def score_free(
    samples: Sequence[Sequence[str]],
    golds: Sequence[str],
    classify: Callable[[str], str],
    questions: Sequence[str] | None = None,
    verify: Verify | None = None,
) -> dict[str, float]:
    """pass@k for k = 1 .. n, route shares (``route_frac/<route>``) and per-route accuracy
    (``route_acc/<route>``, NaN for a route never sampled) of free samples. With ``verify``
    (and the ``questions``) a sample counts only when its steps hold; ``answer_only@1`` is
    then the mean accuracy of the boxed answers alone, so the gap is the share of right
    answers reached by wrong steps."""
    n = len(samples[0])
    if verify is not None and questions is None:
        raise ValueError("score_free: verify needs the questions")
    qs = questions if questions is not None else [""] * len(samples)
    correct = [[judge(q, s, g, verify) for s in group] for group, g, q in zip(samples, golds, qs, strict=True)]
    out = {f"pass@{k}": sum(pass_at_k(n, sum(c), k) for c in correct) / len(correct) for k in range(1, n + 1)}
    if verify is not None:
        out["answer_only@1"] = sum(is_correct(s, g) for group, g in zip(samples, golds, strict=True) for s in group) / (n * len(samples))
    routes = Counter()
    right = Counter()
    for group, flags in zip(samples, correct, strict=True):
        for text, ok in zip(group, flags, strict=True):
            route = classify(text)
            routes[route] += 1
            right[route] += ok
    total = sum(routes.values())
    for route in (*toy_routes.ROUTES, "other"):
        out[f"route_frac/{route}"] = routes[route] / total
        out[f"route_acc/{route}"] = right[route] / routes[route] if routes[route] else float("nan")
    return out


def route_report(
    model,
    tokenizer,
    rows: Sequence[dict],
    num_samples: int = 16,
    forced_samples: int = 4,
    forced: Sequence[str] = toy_routes.ROUTES,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    verify: Verify | None = None,
) -> dict[str, float]:
    """The routes report of a policy on held-out ``rows`` (``toy_routes.generate``'s rows,
    with ``difficulty``): ``<difficulty>/<metric>`` for free sampling (``score_free``) and
    ``<difficulty>/forced/<route>`` (accuracy with the route forced by its first words,
    ``forced_samples`` per prompt), plus ``overall/pass@k``. With ``verify`` every accuracy
    counts a reply only when its steps hold, as the RL reward that checks them."""
    metrics: dict[str, float] = {}
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["difficulty"], []).append(row)
    overall: list[list[str]] = []
    overall_golds: list[str] = []
    overall_questions: list[str] = []
    for kind, group in sorted(by_kind.items()):
        questions = [r["question"] for r in group]
        golds = [r["answer"] for r in group]
        free = sample_with_prefix(model, tokenizer, questions, [""] * len(group), num_samples, max_new_tokens, batch_size, seed)
        metrics.update({f"{kind}/{k}": v for k, v in score_free(free, golds, toy_routes.classify_route, questions, verify).items()})
        overall += free
        overall_golds += golds
        overall_questions += questions
        for route in forced:
            if forced_samples < 1:
                break
            prefixes = [toy_routes.route_prefix(q, route) for q in questions]
            texts = sample_with_prefix(model, tokenizer, questions, prefixes, forced_samples, max_new_tokens, batch_size, seed + 1)
            flat = [(q, t, g) for group_texts, g, q in zip(texts, golds, questions, strict=True) for t in group_texts]
            metrics[f"{kind}/forced/{route}"] = sum(judge(q, t, g, verify) for q, t, g in flat) / len(flat)
            metrics[f"{kind}/forced/{route}/on_route"] = sum(toy_routes.classify_route(t) == route for _, t, _ in flat) / len(flat)
    if overall:
        n = len(overall[0])
        correct = [
            sum(judge(q, s, g, verify) for s in group)
            for group, g, q in zip(overall, overall_golds, overall_questions, strict=True)
        ]
        metrics.update({f"overall/pass@{k}": sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)})
    return metrics


def run_routes(cfg, job_dir: Path) -> dict[str, float]:
    """The pipeline's ``routes`` stage: the routes report of the SFT policy (``sft/<metric>``)
    and of the RL policy (``rl/<metric>``) on the RL stage's held-out routes problems
    (``data.val`` of the RL config, first ``routes.num_examples``), with
    ``routes.num_samples`` free and ``routes.forced_samples`` forced samples per prompt and
    route, replies judged as the RL reward judges them (``routes.verify_steps``: the steps must
    hold too); writes ``<job dir>/routes/metrics.json``. Empty (with a warning) when the
    held-out set is not the routes task."""
    import hydra

    from sedsft.checkpoints import load_model
    from sedsft.data.sources import RoutesSource

    rl_cfg = stage_config("rl", stage_overrides(cfg, "rl", job_dir))
    source = hydra.utils.instantiate(rl_cfg.data.get("val")) if rl_cfg.data.get("val") is not None else None
    if not isinstance(source, RoutesSource):
        log.warning("routes: the RL held-out set is not the routes task (%s); no routes report", source)
        return {}
    rows = source.load()
    rows = [rows[i] for i in range(min(int(cfg.routes.num_examples), len(rows)))]
    verify = steps_hold if bool(cfg.routes.get("verify_steps", False)) else None
    metrics: dict[str, float] = {}
    for name, path in (("sft", job_dir / "sft"), ("rl", job_dir / "rl" / "hf")):
        if not path.exists():
            log.warning("routes: no %s policy at %s; its report is left out", name, path)
            continue
        model, tokenizer = load_model(path, dtype="float32")
        start = time.perf_counter()
        report = route_report(
            model, tokenizer, rows, num_samples=int(cfg.routes.num_samples), forced_samples=int(cfg.routes.forced_samples),
            max_new_tokens=int(cfg.routes.max_new_tokens), seed=int(cfg.seed), verify=verify,
        )  # fmt: skip
        log.info("routes: %s policy reported in %.0f s", name, time.perf_counter() - start)
        metrics.update({f"{name}/{k}": v for k, v in report.items()})
    out = job_dir / "routes" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from sedsft.checkpoints import load_model
    from sedsft.utils.threads import set_cpu_threads

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="policy: a Hugging Face directory, SFT run directory or RL run's hf/")
    parser.add_argument("--n", type=int, default=200, help="held-out problems (half easy, half hard)")
    parser.add_argument("--seed", type=int, default=0, help="held-out generation seed")
    parser.add_argument("--samples", type=int, default=8, help="free samples per prompt (pass@k up to this k)")
    parser.add_argument("--forced-samples", type=int, default=4, help="samples per prompt with a route forced (0: none)")
    parser.add_argument("--ranges", type=json.loads, default=None, help='toy_routes.Ranges overrides as JSON, e.g. {"cap": 31}')
    parser.add_argument("--verify-steps", action="store_true", help="count a reply only when its steps hold (route_steps.steps_hold)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    set_cpu_threads(args.threads, on_cpu=not torch.cuda.is_available())
    logging.basicConfig(level=logging.INFO)
    model, tokenizer = load_model(args.model, dtype="float32")
    rows = toy_routes.generate("heldout", args.n, seed=args.seed, ranges=toy_routes.Ranges(**(args.ranges or {})))
    start = time.perf_counter()
    report = route_report(
        model, tokenizer, rows, num_samples=args.samples, forced_samples=args.forced_samples, seed=args.seed,
        verify=steps_hold if args.verify_steps else None,
    )  # fmt: skip
    report["seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        args.out.write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
