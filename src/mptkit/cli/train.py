"""`mptkit train RECIPE.yaml [key.sub=value ...]` and `mptkit plot RUN`."""

from __future__ import annotations

import argparse
import json


def _train(args: argparse.Namespace) -> int:
    from mptkit.errors import ConfigError
    from mptkit.train.config import load_run_config
    from mptkit.train.restarts import earlier_not_retryable
    from mptkit.train.trainer import Trainer

    prev = earlier_not_retryable()  # torchrun restarted us after an error a restart cannot fix: stop at once
    if prev is not None:
        raise ConfigError(f"not retried: attempt {prev.get('attempt')} of this torchrun job already failed before "
                          "its first step, and a restart fails the same way (fix it, then start a new torchrun): "
                          f"{prev.get('message')}")
    cfg = load_run_config(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=str)), sort_keys=False), end="")
        return 0
    t = Trainer(cfg, sample_fn=end_of_run_sample)  # rank 0 writes the sample into the summary
    summary = t.fit()  # a failed write names its folder (the trainer's own TrainError); other OSErrors: cli.main
    if not t.dist.is_main:
        return 0
    print(f"run {summary['run_name']}: {summary['steps']} steps, {summary['tokens']:,} tokens in "
          f"{summary['train_wall_s']:.0f} s")
    if summary.get("eval_loss") is not None:
        print(f"validation loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f})")
    if summary.get("mixture"):  # a data mixture: what each stream gave, beside what the recipe asked
        print("mixture: " + ", ".join(f"{n} {d['samples']:,} samples ({100 * d['realised_proportion']:.1f}%, asked "
                                      f"{100 * d['proportion']:.1f}%)" for n, d in summary["mixture"]["streams"].items()))
    print(f"metrics: {summary['run_folder']}/metrics.jsonl  (plot: mptkit plot {summary['run_folder']})")
    if summary.get("last_checkpoint"):
        print(f"checkpoint: {summary['last_checkpoint']}")
    if summary.get("export_folder"):
        print(f"model (HF folder): {summary['export_folder']}")
    if summary.get("sample"):
        print("sample:\n" + summary["sample"])
    return 0


def end_of_run_sample(model, tokenizer, cfg) -> str:
    """The recipe's end-of-run sample (``sample_prompt`` and the ``sample_*`` keys): the prompt and what the
    trained model generates after it with mptkit's decoder, seeded with the run's seed."""
    from mptkit.infer import generate_text

    s = cfg.sample
    kw = {"top_k": s.top_k} if s.top_k else {}
    text = generate_text(model, tokenizer, s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                         seed=s.seed, **kw)
    return s.prompt + text


def _plot(args: argparse.Namespace) -> int:
    from mptkit.errors import TrainError
    from mptkit.train.plot import plot_run
    from mptkit.utils.outputs import check_output

    if args.out:  # before the metrics are read and drawn
        check_output(args.out, kind="file", flag="--out", replaceable=lambda p: p.suffix.lower() in (".png", ".svg",
                                                                                                  ".pdf", ".jpg"),
                     earlier="an image", overwrite=None, error=TrainError)
    out = plot_run(args.run, args.out)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from mptkit.recipes import training_recipes

    p = sub.add_parser(
        "train", help="train a model from a YAML recipe (llm-foundry keys)",
        description="Train (pretrain or continue) an MPT model from a YAML recipe. Overrides are key.sub=value "
                    "(YAML values), e.g. max_duration=50ba optimizer.lr=1e-3 model.n_layers=2. "
                    "Launch with torchrun for several processes.")
    p.add_argument("recipe", help="the recipe YAML (e.g. configs/pretrain/quickstart.yaml), or the name of a recipe "
                   f"shipped with mptkit ({', '.join(training_recipes())})")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--print-config", action="store_true", help="print the validated configuration and exit")
    p.set_defaults(func=_train)

    q = sub.add_parser("plot", help="PNG of a run's loss and throughput curves (needs matplotlib)",
                       description="Read RUN/metrics.jsonl and write RUN/curves.png (or --out).")
    q.add_argument("run", help="a run folder (holding metrics.jsonl) or a metrics.jsonl file")
    q.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    q.set_defaults(func=_plot)
